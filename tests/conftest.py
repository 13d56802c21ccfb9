"""Shared fixtures: the repo root on sys.path, and helpers to run the real scripts as a user would."""

from __future__ import annotations

import json
import os
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
    """Run a numbered script in its own process, offline, and return its completed process.

    The process is a fork of tests/zygote.py, which has the heavy libraries imported already (~12 s a run on
    the CI machine), or a plain `python3 ...` where that could differ (tests/zygote.py: usable_for)."""
    full_env = {**os.environ, **SCRIPT_ENV, **(env or {})}
    server = _Zygote.get()
    if server is not None and server.usable_for(list(args), full_env):
        proc = server.run(list(args), full_env, cwd, timeout)
    else:
        proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} salió con {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


SCRIPT_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class _Zygote:
    """One tests/zygote.py per pytest worker, started at the first script run and stopped with the worker."""

    _instance: "_Zygote | None" = None
    _failed = False

    @classmethod
    def get(cls) -> "_Zygote | None":
        if cls._failed or os.environ.get("AFINAR_TEST_PLAIN_SUBPROCESS") == "1":
            return None
        if cls._instance is None:
            try:
                cls._instance = cls()
            except Exception as err:  # noqa: BLE001 - any failure: plain subprocesses, as before
                print(f"[zygote] no disponible ({err}); cada script arranca su propio intérprete", file=sys.stderr)
                cls._failed = True
                return None
        return cls._instance

    def __init__(self):
        import atexit
        import tempfile

        self.env = {**os.environ, **SCRIPT_ENV}
        self.folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))], cwd=ROOT,
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(self.proc.kill)
        ready = self.proc.stdout.readline()
        if not ready or not json.loads(ready).get("ready"):
            raise RuntimeError("el zygote no arrancó")
        self.count = 0

    def usable_for(self, argv: list[str], env: dict) -> bool:
        return zygote.usable_for(argv, env, self.env)

    def run(self, argv: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = json.loads(self.proc.stdout.readline())
        except Exception as failure:  # noqa: BLE001 - the zygote died: later runs start their own interpreter
            type(self)._failed = True
            raise RuntimeError(f"el zygote de las pruebas dejó de responder: {failure}") from None
        stdout = out.read_text(encoding="utf-8", errors="replace")
        stderr = err.read_text(encoding="utf-8", errors="replace")
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess([sys.executable, *argv], answer["returncode"], stdout, stderr)


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
