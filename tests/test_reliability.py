"""Interruptions, numerical faults and atomic writes, tested for real with subprocesses and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_output, run_script, start_script

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"el proceso terminó antes de tiempo:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("tiempo agotado esperando el checkpoint")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """The first 12 entries of tu_dataset.json: enough rows for these few steps, and each run of 03 prepares
    (cleans, measures, plots) 12 entries instead of the whole file; what is tested here is not the data."""
    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))[:12]
    path = tmp_path_factory.mktemp("datos") / "pocos.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


def test_sigkill_then_resume_finishes_the_planned_steps(stage02_dir, small_dataset, tmp_path):
    out = copy_output(stage02_dir, tmp_path / "salida")
    planned, every = 6, 2
    train_args = ("03_train_model.py", "--output-dir", str(out), "--dataset", str(small_dataset), "--preference",
                  "none", "--max-steps", str(planned), "--batch-size", "1", "--max-seq-length", "64",
                  "--save-steps", str(every), "--logging-steps", "1", "--eval-fraction", "0")
    proc = start_script(*train_args)  # a process of its own, killed below with a real SIGKILL
    first = out / "checkpoints" / f"checkpoint-{every}"
    _wait_for(lambda: (first / "trainer_state.json").exists(), 600, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, as when Colab drops the machine
    proc.wait()
    logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    done_at_kill = max(logged)
    assert not (out / "adapter").exists()
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert "train" not in manifest["stages"]  # the stage is not recorded as finished

    resumed = run_script(*train_args, "--resume")
    assert "Reanudando desde" in resumed.stdout
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    metrics = manifest["stages"]["train"]["metrics"]
    assert metrics["global_step"] == planned
    resumed_step = int(metrics["resumed_from"].rsplit("-", 1)[1])
    assert done_at_kill - resumed_step <= every  # at most one checkpoint interval lost
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert steps == sorted(set(steps)) and steps[-1] == planned
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(stage02_dir, small_dataset, tmp_path):
    out = copy_output(stage02_dir, tmp_path / "salida")
    # An absurd learning rate blows the LoRA weights up after the first update: the next loss is inf/NaN.
    proc = run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(small_dataset), "--preference",
                      "none", "--max-steps", "4", "--batch-size", "1", "--max-seq-length", "64",
                      "--save-steps", "1", "--logging-steps", "1", "--learning-rate", "1e30",
                      "--eval-fraction", "0", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dejó de ser finita" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "adapter").exists()
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "debe quedar el último checkpoint bueno"
    from safetensors.torch import load_file

    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values()), checkpoint
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert "train" not in manifest["stages"]


WRITER = r"""
import sys
from afinar.core import atomic
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic.write_json(path, {"version": i, "payload": "x" * 200_000})
"""


def test_kill_during_atomic_writes_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "run.json"
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT)
        time.sleep(0.4 + 0.13 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text(encoding="utf-8"))  # parses: old or new, never half
        assert len(data["payload"]) == 200_000 and data["version"] >= 1
    leftovers = [p for p in tmp_path.iterdir() if p.name != "run.json"]
    # A kill can leave a hidden temp file behind, but never a visible partial artifact.
    assert all(p.name.startswith(".run.json.") for p in leftovers)


def test_unsloth_backend_without_cuda_says_what_to_do(tmp_path):
    proc = run_script("02_load_model.py", "--output-dir", str(tmp_path / "salida"), "--backend", "unsloth",
                      check=False)
    assert proc.returncode == 2
    assert "--backend hf" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "salida").exists()  # refused before anything was written


def test_remote_code_is_never_trusted():
    """No call in the package or the scripts may enable trust_remote_code."""
    import re

    sources = list((ROOT / "afinar").rglob("*.py")) + list(ROOT.glob("0*_*.py"))
    values = {str(p): re.findall(r"trust_remote_code[\"']?\s*[=:]\s*([\w.]+)", p.read_text(encoding="utf-8"))
              for p in sources}
    enabled = {path: found for path, found in values.items() if any(v != "False" for v in found)}
    assert enabled == {}
    assert any(values.values())  # the loaders do pass it, explicitly off
