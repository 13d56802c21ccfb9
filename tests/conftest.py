"""Shared fixtures: the repo root on sys.path, and helpers to run the real scripts as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zygote  # tests/zygote.py: this folder is on sys.path, as pytest puts a conftest's folder there

# pytest-xdist workers (pyproject.toml: -n 2) run side by side, one per core: each one, and every script it starts,
# uses one thread. Two threads per worker would be four on two cores, and PyTorch's OpenMP threads then wait on each
# other (a generation step ran ~10x slower that way); set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_script(*args: str, env: dict | None = None, timeout: int = 900, check: bool = True,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a numbered script (or `-m module`) in its own process, offline, and return its completed process.

    The process is a fork of tests/zygote.py, which has the heavy libraries imported already (~12 s a run on
    the CI machine), or a plain `python3 ...` where that could differ (tests/zygote.py: usable_for)."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    server = _Zygote.get()
    proc = server.run(list(args), full_env, cwd, timeout) if server is not None else None
    if proc is None:
        proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} salió con {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def start_script(*args: str, env: dict | None = None, cwd: Path = ROOT, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT):
    """`subprocess.Popen([python3, *args], ..., text=True)` for a script a test watches, signals or kills: a
    fork of the zygote where run_script would use one (its pid is the script's own process), else a Popen."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    server = _Zygote.get()
    if server is not None and server.usable_for(list(args), full_env):
        with contextlib.ExitStack() as opened:
            devnull = opened.enter_context(open(os.devnull, "r+b"))
            reader = None
            if stdout == subprocess.PIPE:
                reader, writer = os.pipe()
                opened.callback(os.close, writer)
                out = writer
            else:
                assert stdout == subprocess.DEVNULL, stdout
                out = devnull.fileno()
            err = out if stderr == subprocess.STDOUT else devnull.fileno()
            assert stderr in (subprocess.STDOUT, subprocess.DEVNULL), stderr
            proc = server.start(list(args), full_env, cwd, (devnull.fileno(), out, err))
            if proc is not None:
                proc.stdout = open(reader, encoding="utf-8", errors="replace") if reader is not None else None
                return proc
            if reader is not None:
                os.close(reader)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=full_env, stdout=stdout, stderr=stderr, text=True)


SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class ZygoteProcess:
    """The part of subprocess.Popen the tests use, for a child of the zygote: the pid is the script's process."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str]):
        self._conn, self.pid, self.args = conn, pid, [sys.executable, *args]
        self.returncode: int | None = None
        self.stdout = None

    def _finish(self) -> None:
        data = self._conn.recv(1 << 16)
        self._conn.close()
        if not data:
            raise RuntimeError("el zygote de las pruebas perdió el proceso")
        self.returncode = json.loads(data)["returncode"]

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class _Zygote:
    """A tests/zygote.py with the environment `env`, and the `python3` that reaches it (`shim`).

    One per pytest worker (`get`), started at the first script run and stopped with the worker; the notebook
    tests start one with their kernel's environment (`kernel_zygote`)."""

    _instance: "_Zygote | None" = None
    _failed = False

    @classmethod
    def get(cls) -> "_Zygote | None":
        if cls._failed or os.environ.get("AFINAR_TEST_PLAIN_SUBPROCESS") == "1":
            return None
        if cls._instance is None:
            try:
                cls._instance = cls({**os.environ, **SCRIPT_ENV})
                cls._instance.wait_ready()
            except Exception as err:  # noqa: BLE001 - any failure: plain subprocesses, as before
                print(f"[zygote] no disponible ({err}); cada script arranca su propio intérprete", file=sys.stderr)
                cls._failed = True
                return None
        return cls._instance

    def __init__(self, env: dict):
        import atexit
        import tempfile

        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.socket = self.folder / "socket"
        self.shim = self.folder / "bin" / "python3"
        self.shim.parent.mkdir()
        self.shim.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})"
                             f"\nfrom python_shim import main\nmain({sys.executable!r}, {str(self.socket)!r})\n",
                             encoding="utf-8")
        self.shim.chmod(0o755)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py")), str(self.socket),
                                      str(self.shim)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        atexit.register(self._cleanup)
        self.ready = False

    def _cleanup(self) -> None:
        import shutil

        self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait_ready(self) -> None:
        if not self.ready:
            line = self.proc.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError("el zygote no arrancó")
            self.ready = True

    def stop(self) -> None:
        self.proc.stdin.close()  # the zygote ends when its stdin does
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._cleanup()

    def runs(self) -> list[str]:
        log = self.folder / "runs.log"
        return log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def usable_for(self, argv: list[str], env: dict) -> bool:
        return zygote.usable_for(argv, env, self.env)

    def start(self, argv: list[str], env: dict, cwd: Path, stdio: tuple[int, int, int]) -> ZygoteProcess | None:
        """The child started, or None where the zygote cannot run it the way a fresh interpreter would."""
        if not self.usable_for(argv, env):
            return None
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.connect(str(self.socket))
            socket.send_fds(conn, [json.dumps({"argv": argv, "env": env, "cwd": str(cwd)}).encode()], list(stdio))
            answer = json.loads(conn.recv(1 << 16) or b"{}")
        except Exception as failure:  # noqa: BLE001 - the zygote died: later runs start their own interpreter
            type(self)._failed = True
            raise RuntimeError(f"el zygote de las pruebas dejó de responder: {failure}") from None
        if "pid" not in answer:
            conn.close()
            return None
        return ZygoteProcess(conn, answer["pid"], argv)

    def run(self, argv: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess | None:
        import tempfile

        with tempfile.TemporaryFile(dir=self.folder) as out, tempfile.TemporaryFile(dir=self.folder) as err, \
                open(os.devnull, "rb") as devnull:
            proc = self.start(argv, env, cwd, (devnull.fileno(), out.fileno(), err.fileno()))
            if proc is None:
                return None
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                timed_out = True
            else:
                timed_out = False
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode("utf-8", errors="replace")
            stderr = err.read().decode("utf-8", errors="replace")
        if timed_out:
            raise subprocess.TimeoutExpired(proc.args, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def kernel_zygote(env: dict, folder: Path):
    """For a notebook executed with `env`: a zygote with the kernel's environment, and the kernel's
    sys.executable pointed at its `python3`, so that the stages a cell starts with `[sys.executable, script]`
    (each still a process of its own, see tests/zygote.py) skip the ~12 s of imports. Yields the environment to
    give the kernel. Where the zygote is off, the same environment without the redirection."""
    if _Zygote._failed or os.environ.get("AFINAR_TEST_PLAIN_SUBPROCESS") == "1":
        yield env
        return
    server = _Zygote(env)
    startup = folder / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    # IPython runs its profile's startup files in the kernel before the first cell.
    (startup / "00-zygote.py").write_text(f"import sys\nsys.executable = {str(server.shim)!r}\n", encoding="utf-8")
    try:
        yield {**env, "IPYTHONDIR": str(folder / "ipython")}
    finally:
        print("[zygote del cuaderno]", *server.runs(), sep="\n  ")
        server.stop()


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from afinar.core import embedded

    return embedded.ensure_checkpoint(verbose=False)


SMALL_QUESTIONS = [
    {"pregunta": "¿De dónde proviene el oxígeno que liberan las plantas durante la fotosíntesis?",
     "palabras_clave": ["agua", "fotólisis"]},
    {"pregunta": "¿Respiran las plantas?", "palabras_clave": ["respir"]},
    {"pregunta": "¿Necesita oscuridad el ciclo de Calvin?"},
]


def small_inputs(work: Path, entries: int = 24) -> tuple[Path, Path]:
    """(questions file with SMALL_QUESTIONS, dataset of the first `entries` entries of tu_dataset.json) in `work`:
    what the notebook runs train on, a few steps instead of the whole demo."""
    import json

    questions = work / "preguntas.json"
    questions.write_text(json.dumps(SMALL_QUESTIONS, ensure_ascii=False), encoding="utf-8")
    dataset = work / "datos.json"
    rows = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))[:entries]
    dataset.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return questions, dataset


def small_probe(path: Path, pairs: int = 2) -> Path:
    """The first pairs of the project's misconception probe. Stage 04 scores every pair twice (adapter off and
    on): the 35 pairs of sondas_errores.json are ~18,000 tokens of forward passes per 04, which tests that do not
    look at the probe need not pay. The probe itself is tested in test_misconceptions.py, and the default file
    still runs in test_copy_paste.py and the notebook tests."""
    import json

    probe = json.loads((ROOT / "sondas_errores.json").read_text(encoding="utf-8"))[:pairs]
    path.write_text(json.dumps(probe, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def stage02_dir(tmp_path_factory) -> Path:
    """A finished stage 02 on the embedded model, made once per session. Copy it before changing it."""
    import json

    work = tmp_path_factory.mktemp("stage02")
    questions = work / "preguntas.json"
    questions.write_text(json.dumps(SMALL_QUESTIONS, ensure_ascii=False), encoding="utf-8")
    out = work / "salida"
    # fp32: the tests built on this (resume, NaN, data parallel) compare numbers exactly, and fp32 is the
    # precision every CPU has; the bf16 default is exercised by the end-to-end and notebook tests.
    run_script("02_load_model.py", "--output-dir", str(out), "--questions", str(questions), "--max-new-tokens", "12",
               "--precision", "fp32", "--probe-file", str(small_probe(work / "sonda.json")))
    return out


def copy_output(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target
