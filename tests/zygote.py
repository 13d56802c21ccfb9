"""A process that has already imported torch, transformers, peft and TRL, and forks a fresh child per script run.

On the 2-core CI machine `import peft` alone takes ~11 s (it pulls transformers' modeling code, which pulls
torch._dynamo), and every stage that loads a model pays it: dozens of runs of the numbered scripts made a large
share of the test command's time. Each run here is still a separate process that runs the real script as
`python3 script.py args` would (its own argv, environment, working directory, stdout/stderr and exit code); only
the imports happen once, before the fork.

Protocol (one JSON object per line): the test sends {"argv", "env", "cwd", "stdout", "stderr", "timeout"} on
stdin; the zygote answers {"returncode", "timed_out"}. tests/conftest.py falls back to a plain subprocess for
anything this cannot reproduce (see `usable_for`).

Nothing in the zygote may run a PyTorch operation: a child forked after OpenMP's thread pool has started can hang.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

# Environment read when these libraries are imported (cache folders, offline mode, CPU kernels, thread counts):
# a run that changes any of them gets a plain subprocess instead. HF_TOKEN is read when it is used.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "ATEN_", "ONEDNN", "DNNL",
                        "OMP_", "MKL_", "KMP_", "CUDA", "TOKENIZERS", "PYTHON", "XDG_", "TRITON", "LD_", "HOME",
                        "TMPDIR", "ACCELERATE", "TRL_", "PEFT_", "DATASETS", "USE_")
RUNTIME_ONLY = {"HF_TOKEN", "PYTHONUNBUFFERED"}


def import_time_env(env: dict) -> dict:
    return {key: value for key, value in env.items()
            if key.startswith(IMPORT_TIME_PREFIXES) and key not in RUNTIME_ONLY}


def usable_for(argv: list[str], env: dict, zygote_env: dict) -> bool:
    """A numbered script (not `-m` or `-c`), with the same import-time environment as the zygote's."""
    return bool(argv) and argv[0].endswith(".py") and import_time_env(env) == import_time_env(zygote_env)


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


def _child(request: dict) -> None:
    """Become `python3 argv...` in `cwd` with `env`; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills whatever it started too
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        # What a fresh interpreter has: Ctrl+C raises KeyboardInterrupt, SIGTERM kills, SIGPIPE is ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        script = os.path.abspath(request["argv"][0])
        sys.argv = [request["argv"][0], *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)
        import runpy

        try:
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


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.05)


def main() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        returncode, timed_out = _wait(pid, request["timeout"])
        print(json.dumps({"returncode": returncode, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    main()
