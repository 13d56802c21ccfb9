"""Issue 18, slow half: --resume after a kill during a checkpoint save, --overwrite that loses nothing, and
training that did nothing refused. Real scripts, the real embedded model, real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_output, run_script, start_script

pytestmark = pytest.mark.slow

# A short and fast training: 12 entries, rows of 64 tokens, one checkpoint per step.
FAST = ("--batch-size", "1", "--save-steps", "1", "--logging-steps", "1", "--eval-fraction", "0",
        "--max-seq-length", "64")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))[:12]
    path = tmp_path_factory.mktemp("datos") / "pocos.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_dir(stage02_dir, small_dataset, tmp_path_factory) -> Path:
    """Stage 03 finished with 2 steps: complete checkpoint-1 and checkpoint-2. Copy it before changing it."""
    out = copy_output(stage02_dir, tmp_path_factory.mktemp("trained") / "salida")
    run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(small_dataset), "--max-steps", "2",
               *FAST)
    return out


def _train(out: Path, dataset: Path, *extra: str, check: bool = False) -> subprocess.CompletedProcess:
    return run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(dataset), *FAST, *extra,
                      check=check)


def _record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"].get("train")


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_skips_an_empty_or_partial_newest_checkpoint(trained_dir, small_dataset, tmp_path):
    """Defect 1: `mkdir checkpoints/checkpoint-3` beside complete 1-2 made every later --resume fail."""
    out = copy_output(trained_dir, tmp_path / "salida")
    (out / "checkpoints" / "checkpoint-3").mkdir()
    # A kill during the optimizer save of step 4: the adapter is there, trainer_state.json never came.
    partial = out / "checkpoints" / "checkpoint-4"
    partial.mkdir()
    shutil.copy(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors", partial)
    (partial / "optimizer.pt").write_bytes(b"\x80\x02cortado")
    proc = _train(out, small_dataset, "--resume", "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Se descarta" in proc.stdout and "checkpoint-3" in proc.stdout and "checkpoint-4" in proc.stdout
    assert "Reanudando desde" in proc.stdout and "checkpoint-2 (el último checkpoint completo" in proc.stdout
    metrics = _record(out)["metrics"]
    assert metrics["resumed_from"] == "checkpoints/checkpoint-2" and metrics["global_step"] == 3
    assert not partial.exists()  # removed, so the trainer's rotation never keeps it instead of a good one
    assert (out / "checkpoints" / "checkpoint-3" / "afinar_completo.json").exists()


def test_resume_without_checkpoints_does_not_retrain_a_finished_stage(trained_dir, small_dataset, tmp_path):
    """Defect 7: with checkpoints/ gone, --resume retrained from scratch and replaced adapter/ silently."""
    out = copy_output(trained_dir, tmp_path / "salida")
    shutil.rmtree(out / "checkpoints")
    before = _tree(out)
    proc = _train(out, small_dataset, "--resume", "--max-steps", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr and "checkpoint completo" in proc.stderr
    assert _tree(out) == before


def test_resume_past_the_planned_end_is_refused_before_loading(trained_dir, small_dataset, tmp_path):
    """Defect 3: resuming at the last step trained nothing and still said "Listo"."""
    out = copy_output(trained_dir, tmp_path / "salida")
    before = _tree(out)
    proc = _train(out, small_dataset, "--resume", "--max-steps", "2")
    assert proc.returncode == 2 and "no queda nada por entrenar" in proc.stderr, proc.stderr[-3000:]
    assert "Cargando el modelo" not in proc.stdout
    assert _tree(out) == before


def test_failed_overwrite_restores_everything_and_an_unmoved_adapter_is_not_success(trained_dir, small_dataset,
                                                                                    tmp_path):
    """Defects 2 and 3 together: a learning rate that underflows to 0 in float32 leaves the adapter exactly as
    it started. That must fail (not "Listo"), and the --overwrite it ran under must give back the old run."""
    out = copy_output(trained_dir, tmp_path / "salida")
    before, stages = _tree(out), json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"]
    proc = _train(out, small_dataset, "--overwrite", "--max-steps", "2", "--learning-rate", "1e-50")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "el adaptador no cambió" in proc.stderr and "Listo" not in proc.stdout
    assert "Se restauraron los resultados anteriores" in proc.stdout
    after = _tree(out)
    after.pop("run.json"), before.pop("run.json")  # rewritten (updated_at), checked below
    assert after == before
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert manifest["stages"] == stages and "train_in_progress" not in manifest


def test_one_step_moves_the_adapter(stage02_dir, small_dataset, tmp_path):
    """Defect 3: with --max-steps 1 the only step ran at the warmup's learning rate of 0. Also defect 8: in a
    folder with spaces the next command is quoted, and no loss curve is announced when none was drawn."""
    out = copy_output(stage02_dir, tmp_path / "salida con espacios")
    proc = _train(out, small_dataset, "--max-steps", "1", "--logging-steps", "5")  # no step is logged
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial, trained = _adapter(out / "adapter_inicial"), _adapter(out / "adapter")
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 0
    assert not (out / "loss.png").exists() and "Curva de pérdida" not in proc.stdout
    assert f"python 04_inference_and_export.py --output-dir '{out}'" in proc.stdout
    assert _record(out)["loss_plot"] is None


def _without_capabilities() -> list[str]:
    """Root ignores permission bits; without its capabilities it obeys them like any user."""
    return ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"] if os.geteuid() == 0 else []


def _run_as_user(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*_without_capabilities(), sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_read_only_output_directory_is_a_spanish_message(trained_dir, small_dataset, tmp_path):
    """Defect 4: a read-only output directory gave a PermissionError traceback."""
    parent = tmp_path / "solo_lectura"
    parent.mkdir()
    out = copy_output(trained_dir, parent / "salida")
    out.chmod(0o555)
    parent.chmod(0o555)
    try:
        proc = _run_as_user("02_load_model.py", "--output-dir", str(parent / "nueva"), "--model", "smollm2-135m")
        assert proc.returncode == 2 and "no hay permiso para escribir" in proc.stderr, proc.stderr[-3000:]
        proc = _run_as_user("03_train_model.py", "--output-dir", str(out), "--dataset", str(small_dataset),
                            "--overwrite", *FAST)
        assert proc.returncode == 2 and "no hay permiso para escribir" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "Cargando el modelo" not in proc.stdout
    finally:
        parent.chmod(0o755)
        out.chmod(0o755)


def test_failed_02_overwrite_puts_the_old_run_back(trained_dir, embedded_path, tmp_path):
    """Defect 2 for stage 02: a failure after the old run was set aside (here a model without a chat
    template, found only once it is loaded) leaves the old run exactly as it was."""
    model = tmp_path / "sin_plantilla"
    model.mkdir()
    for item in embedded_path.iterdir():
        if item.name != "chat_template.jinja":
            (model / item.name).symlink_to(item)
    out = copy_output(trained_dir, tmp_path / "salida")
    before = _tree(out)
    proc = run_script("02_load_model.py", "--output-dir", str(out), "--model", str(model), "--overwrite",
                      "--precision", "fp32", check=False)
    assert proc.returncode == 2 and "plantilla de chat" in proc.stderr, proc.stderr[-3000:]
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["salida", "sin_plantilla"]  # no copy left aside


def _popen(*args: str):
    # A process of its own (tests/conftest.py: start_script), killed below with a real SIGKILL.
    return start_script(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_at_several_points_of_a_checkpoint_save_then_resume(stage02_dir, small_dataset, tmp_path):
    """SIGKILL while the trainer writes a checkpoint: as soon as its folder appears, as soon as the optimizer
    file appears, as soon as trainer_state.json appears. Each time --resume must take the newest complete
    checkpoint (never the one being written), and the last resume must finish the planned steps."""
    from afinar.core import checkpoints

    out = copy_output(stage02_dir, tmp_path / "salida")
    planned = 8
    args = ("03_train_model.py", "--output-dir", str(out), "--dataset", str(small_dataset), *FAST,
            "--max-steps", str(planned))
    folder = out / "checkpoints"
    complete_step, saw_partial, states = 0, False, []
    for kill_when in (None, "optimizer.pt", "trainer_state.json"):
        target = folder / f"checkpoint-{complete_step + 2}"  # one complete save in this run, then the kill
        proc = _popen(*args, *(("--resume",) if complete_step else ()))
        deadline = time.monotonic() + 900
        while not (target / kill_when).exists() if kill_when else not target.is_dir():
            assert proc.poll() is None, "el entrenamiento terminó antes de la interrupción"
            assert time.monotonic() < deadline, "tiempo agotado esperando el checkpoint"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        states.append((kill_when or "carpeta", target.name, sorted(p.name for p in target.iterdir())))
        chosen, broken = checkpoints.newest_complete(folder)
        saw_partial |= any(path == target for path, _ in broken)
        assert chosen is not None and checkpoints.step_of(chosen) >= complete_step + 1
        assert checkpoints.step_of(chosen) <= complete_step + 2
        complete_step = checkpoints.step_of(chosen)
        assert _record(out) is None  # the stage is not recorded as finished
    print("estado de cada checkpoint al matar el proceso:", *states, sep="\n  ")
    assert saw_partial, f"ninguna interrupción cayó a mitad de un guardado: {states}"

    proc = run_script(*args, "--resume")
    assert f"checkpoint-{complete_step} (el último checkpoint completo" in proc.stdout
    metrics = _record(out)["metrics"]
    assert metrics["global_step"] == planned and metrics["resumed_from"] == f"checkpoints/checkpoint-{complete_step}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == sorted(set(steps)) and steps[-1] == planned
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_failed_04_overwrite_keeps_the_previous_report(trained_dir, tmp_path):
    """Nothing on disk is lost by a failed 04 --overwrite either: here its questions file went bad after the
    first export, which is only noticed after the model is loaded and the old report was set aside."""
    out = copy_output(trained_dir, tmp_path / "salida")
    run_script("04_inference_and_export.py", "--output-dir", str(out), "--no-merge")
    before = _tree(out)
    bad = tmp_path / "preguntas_rotas.json"
    bad.write_text('[{"pregunta": ""}]', encoding="utf-8")
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    manifest["questions_file"] = str(bad)
    (out / "run.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    proc = run_script("04_inference_and_export.py", "--output-dir", str(out), "--no-merge", "--overwrite",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "preguntas_rotas.json" in proc.stderr, \
        proc.stderr[-3000:]
    after = _tree(out)
    after.pop("run.json"), before.pop("run.json")
    assert after == before
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"]["export"] == \
        manifest["stages"]["export"]
