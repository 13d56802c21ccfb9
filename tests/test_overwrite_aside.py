"""afinar.core.overwrite and afinar.core.checkpoints on real files: what --overwrite keeps and what --resume trusts."""

from __future__ import annotations

import json

import pytest

from afinar.core import checkpoints, overwrite


def _fill(root):
    (root / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"viejo")
    (root / "metrics.jsonl").write_text('{"step": 2}\n', encoding="utf-8")
    return [root / "checkpoints", root / "metrics.jsonl", root / "loss.png"]  # loss.png does not exist


def test_failure_puts_the_old_outputs_back(tmp_path):
    paths = _fill(tmp_path)
    with pytest.raises(RuntimeError):
        with overwrite.set_aside(paths):
            assert not (tmp_path / "checkpoints").exists()  # moved, not deleted
            (tmp_path / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # the new run's partial output
            (tmp_path / "loss.png").write_bytes(b"nuevo")
            raise RuntimeError("la nueva ejecución falla")
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.pt").read_bytes() == b"viejo"
    assert not (tmp_path / "checkpoints" / "checkpoint-1").exists()
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "loss.png", "metrics.jsonl"]


def test_success_deletes_the_old_outputs(tmp_path):
    paths = _fill(tmp_path)
    with overwrite.set_aside(paths):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 1}\n'


def test_copy_left_by_a_killed_run_is_the_one_kept(tmp_path):
    paths = _fill(tmp_path)
    aside = overwrite.aside_path(tmp_path / "metrics.jsonl")
    aside.write_text('{"step": 50}\n', encoding="utf-8")  # the last good one, set aside by a run that was killed
    with pytest.raises(KeyboardInterrupt):
        with overwrite.set_aside(paths):
            raise KeyboardInterrupt
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 50}\n'
    assert not aside.exists()


def _checkpoint(folder, step, files=checkpoints.REQUIRED, marked=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}" if name.endswith(".json") else "x" * 100, encoding="utf-8")
    if marked:
        checkpoints.mark_complete(path)
    return path


def test_newest_complete_skips_every_kind_of_partial_checkpoint(tmp_path):
    good = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 11, files=())  # a marker alone cannot vouch for files that are not there
    _checkpoint(tmp_path, 10, files=(), marked=False)  # mkdir only
    _checkpoint(tmp_path, 9, files=("adapter_model.safetensors",), marked=False)  # killed in the adapter save
    _checkpoint(tmp_path, 8, files=checkpoints.REQUIRED[:-1], marked=False)  # killed before trainer_state.json
    torn = _checkpoint(tmp_path, 7)
    (torn / "optimizer.pt").write_text("x" * 10, encoding="utf-8")  # shorter than the marker says
    cut = _checkpoint(tmp_path, 6, marked=False)
    (cut / "trainer_state.json").write_text('{"global_step": ', encoding="utf-8")
    chosen, broken = checkpoints.newest_complete(tmp_path)
    assert chosen == good
    reasons = {checkpoints.step_of(path): reason for path, reason in broken}
    assert sorted(reasons) == [6, 7, 8, 9, 10, 11]
    assert "trainer_state.json" in reasons[8] and "optimizer.pt" in reasons[7] and "cortado" in reasons[6]
    checkpoints.remove_incomplete(broken)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_unmarked_complete_checkpoint_is_trusted(tmp_path):
    """Killed after the trainer's last file but before the marker (or written before markers existed)."""
    _checkpoint(tmp_path, 1)
    newer = _checkpoint(tmp_path, 3, marked=False)
    assert checkpoints.newest_complete(tmp_path) == (newer, [])
    assert json.loads((tmp_path / "checkpoint-1" / checkpoints.MARKER).read_text())["step"] == 1
