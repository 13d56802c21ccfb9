"""Which checkpoint `--resume` may trust, and the marker that says a checkpoint was written to the end.

The trainer writes a checkpoint file by file into `checkpoints/checkpoint-N` (adapter, optimizer, scheduler,
RNG states, trainer_state.json last). A kill in the middle, the Colab disconnect `--resume` exists for,
leaves a folder with some of them, or none: picking the highest N blindly then failed for good. So:

- after the trainer has saved a checkpoint, `mark_complete` writes MARKER into it, atomically and last,
  listing the files and their sizes;
- `newest_complete` walks the checkpoints from the highest step down and takes the first one that is
  complete: with a marker, every listed file present with its size; without one (a kill after the trainer
  finished but before the marker, or a run from before the marker existed), every file the trainer needs
  to resume present and trainer_state.json, written last, readable;
- the incomplete ones are named, and removed before training resumes, so the trainer's rotation
  (save_total_limit) never counts a broken folder as one of the checkpoints it keeps.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from afinar.core import atomic

MARKER = "afinar_completo.json"
# What Trainer._load_from_checkpoint / _load_optimizer_and_scheduler read back for a LoRA run.
REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json")
_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    found = _NAME.match(path.name)
    return int(found.group(1)) if found else None


def all_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, highest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def mark_complete(checkpoint: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MARKER}
    atomic.write_json(checkpoint / MARKER, {"step": step_of(checkpoint), "files": files})


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (Spanish), or None if it can."""
    missing = [name for name in REQUIRED if not (checkpoint / name).is_file()]
    if missing:
        return "falta " + ", ".join(missing)
    marker = checkpoint / MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
            sizes = {str(name): int(size) for name, size in listed.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"su marca {MARKER} está dañada"
        for name, size in sizes.items():
            path = checkpoint / name
            if not path.is_file():
                return f"falta {name}"
            if path.stat().st_size != size:
                return f"{name} está incompleto ({path.stat().st_size} de {size} bytes)"
        return None
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json está cortado"
    return None


def newest_complete(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The highest-step complete checkpoint, and every incomplete one seen (path, reason)."""
    broken: list[tuple[Path, str]] = []
    chosen = None
    for checkpoint in all_checkpoints(folder):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            chosen = chosen or checkpoint
        else:
            broken.append((checkpoint, reason))
    return chosen, broken


def remove_incomplete(broken: list[tuple[Path, str]]) -> None:
    """Partial folders hold nothing resumable; left in place, the trainer's rotation would count them as kept
    checkpoints and delete a complete one instead."""
    for checkpoint, _ in broken:
        shutil.rmtree(checkpoint, ignore_errors=True)
