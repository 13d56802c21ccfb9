"""A process that has already imported torch, transformers, peft and TRL, and forks a fresh child per script run.

On the 2-core CI machine `import peft` alone takes ~11 s (it pulls transformers' modeling code, which pulls
torch._dynamo), and every stage that loads a model pays it: dozens of runs of the numbered scripts made a large
share of the test command's time. Each run here is still a separate process that runs the real script as
`python3 script.py args` (or `python3 -m module args`) would: its own pid, argv, environment, working directory,
stdin/stdout/stderr and exit code; only the imports happen once, before the fork.

Protocol: a client connects to the zygote's Unix socket (SOCK_SEQPACKET) and sends one JSON message
{"argv", "env", "cwd"} with the child's stdin, stdout and stderr attached as file descriptors (SCM_RIGHTS). A
runner forked for that connection answers {"usable": false} (the client then starts a real interpreter), or
{"pid"} as soon as the child exists and {"returncode"} when it ends. The client may signal the pid directly (a
SIGKILL test does); if the client goes away first, the runner kills the child's process group. Runs are
concurrent: the ranks of a torchrun, or a stage a test runs while it watches another one.

`python_shim.py`, named `python3` in a folder of the test's, is the client for code that starts the interpreter
itself (a notebook's `subprocess`, torchrun's workers, 04's export worker): it passes its own stdio, forwards the
signals it gets and exits as the child did.

Nothing in the zygote may run a PyTorch operation: a child forked after OpenMP's thread pool has started can hang.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

# Environment read when these libraries are imported (cache folders, offline mode, CPU kernels, thread counts):
# a run that changes any of them gets a plain subprocess instead. HF_TOKEN is read when it is used.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "ATEN_", "ONEDNN", "DNNL",
                        "OMP_", "MKL_", "KMP_", "CUDA", "TOKENIZERS", "PYTHON", "XDG_", "TRITON", "LD_", "HOME",
                        "TMPDIR", "ACCELERATE", "TRL_", "PEFT_", "DATASETS", "USE_")
# Read when they are used, never at import: PYTHON and PYTHON_EXEC name the interpreter that 01_setup.sh and
# torchrun start; torchrun hands its workers their rendezvous in TORCHELASTIC_* and TORCH_NCCL_ASYNC_ERROR_HANDLING
# (read when the process group is created).
RUNTIME_ONLY = {"HF_TOKEN", "PYTHONUNBUFFERED", "PYTHON", "PYTHON_EXEC", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
RUNTIME_ONLY_PREFIXES = ("TORCHELASTIC_",)
MAX_MESSAGE = 1 << 20


def import_time_env(env: dict) -> dict:
    return {key: value for key, value in env.items()
            if key.startswith(IMPORT_TIME_PREFIXES) and key not in RUNTIME_ONLY
            and not key.startswith(RUNTIME_ONLY_PREFIXES)}


def runs_code(argv: list[str]) -> bool:
    """A script (`x.py ...`) or a module (`-m name ...`), not `-c` or other interpreter flags."""
    return bool(argv) and (argv[0].endswith(".py") or (argv[0] == "-m" and len(argv) > 1
                                                       and not argv[1].startswith("-")))


def usable_for(argv: list[str], env: dict, zygote_env: dict) -> bool:
    """Code the zygote can run (`runs_code`), with the same import-time environment as the zygote's."""
    return runs_code(argv) and import_time_env(env) == import_time_env(zygote_env)


def _preload() -> None:
    import torch  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401


def _child(request: dict, fds: list[int], shim: str | None) -> None:
    """Become `python3 argv...` in `cwd` with `env` and the given stdio; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a client that goes away kills whatever it started too
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # What a fresh interpreter has: Ctrl+C raises KeyboardInterrupt, SIGTERM kills, SIGPIPE is ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdin = open(0, closefd=False)
        if request.get("unbuffered") or os.environ.get("PYTHONUNBUFFERED"):
            import io

            sys.stdout, sys.stderr = (
                io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                 write_through=True) for fd in (1, 2))
        else:
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        if shim:
            # What this child starts with sys.executable (04's export worker, torchrun's ranks) comes back here.
            sys.executable = shim
        import runpy

        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0], as -m does
                sys.path[0] = os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                script = os.path.abspath(argv[0])
                sys.argv = [argv[0], *argv[1:]]
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as done:
            if done.code is None:
                code = 0
            elif isinstance(done.code, int):
                code = done.code
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            import traceback

            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError:
        pass  # the client is gone; the runner notices on its next read


def _log(log: str, request: dict, zygote_env: dict, usable: bool) -> None:
    """One line per request in runs.log beside the socket: what ran here, and why the rest did not."""
    if usable:
        line = f"zygote: {request['argv'][:2]}"
    else:
        got, have = import_time_env(request["env"]), import_time_env(zygote_env)
        differ = sorted(key for key in got.keys() | have.keys() if got.get(key) != have.get(key))
        line = f"fallback: {request['argv'][:2]} import-time environment differs in {differ}"
    with open(log, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def _runner(conn: socket.socket, zygote_env: dict, shim: str | None, log: str) -> None:
    """Serve one connection: fork the child, report its pid, then its exit code; never returns."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        request = json.loads(data)
        usable = len(fds) == 3 and usable_for(request["argv"], request["env"], zygote_env)
        _log(log, request, zygote_env, usable)
        if not usable:
            _send(conn, {"usable": False})
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(request, fds, shim)
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        try:
            waitable = os.pidfd_open(pid)
        except (AttributeError, OSError):
            waitable = None
        while True:
            ready, _, _ = select.select([conn] + ([waitable] if waitable is not None else []), [], [],
                                        None if waitable is not None else 0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                break
            if conn in ready and not conn.recv(16):  # the client went away: so does what it started
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                break
    finally:
        os._exit(0)


def main() -> None:
    path, shim = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    zygote_env = dict(os.environ)
    # Bound before the imports: a client that comes early waits in the backlog instead of missing the zygote.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 5)
        while True:  # reap finished runners
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if sys.stdin in ready and not sys.stdin.readline():
            break  # the test process that started this one is gone
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                _runner(conn, zygote_env, shim, os.path.join(os.path.dirname(path), "runs.log"))
            conn.close()


if __name__ == "__main__":
    main()
