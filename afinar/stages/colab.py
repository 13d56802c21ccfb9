"""What the notebook runs next, read from run.json: the same "Ejecutar todo" continues any run.

A Colab runtime disconnects (the kernel restarts, /content stays) or resets (/content is wiped; with the
output on Google Drive, run.json survives). In both cases the user presses "Ejecutar todo" again, and each
stage cell asks `next_step` whether its stage still has to run and with which flags: a finished stage is
skipped, an interrupted training continues from its last complete checkpoint, an interrupted stage 02 is
started again. The decision comes from run.json and the checkpoints folder only, the state the stages
themselves trust, so the notebook never guesses from its own variables (lost on every restart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from afinar.core import checkpoints, manifest
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout

STAGE_NAMES = {"load": "02", "train": "03", "export": "04"}


@dataclass(frozen=True)
class Step:
    """Whether a stage cell runs its script, the flags it adds, and the Spanish line that says why."""

    run: bool
    flags: list[str] = field(default_factory=list)
    reason: str = ""


def _readable_manifest(layout: OutputLayout) -> dict | None:
    if not layout.manifest.is_file():
        return None
    try:
        return manifest.read(layout)
    except UserError:
        return None  # a damaged run.json: the stage itself explains it with its own message


def next_step(output_dir: str | Path, stage: str, overwrite: bool = False) -> Step:
    """The step for `stage` ("load", "train" or "export") given what run.json says is finished."""
    if stage not in STAGE_NAMES:
        raise ValueError(f"etapa desconocida: {stage}")
    layout = OutputLayout.at(output_dir)
    number = STAGE_NAMES[stage]
    if overwrite:
        return Step(True, ["--overwrite"], f"OVERWRITE = True: la etapa {number} se repite desde cero.")
    data = _readable_manifest(layout)
    record = manifest.finished(data or {}, stage)
    if record:
        return Step(False, [], f"La etapa {number} ya terminó ({record.get('finished_at', '?')}, según "
                               f"{layout.manifest}): se salta. Para repetirla desde cero, pon OVERWRITE = True.")
    if stage == "load":
        if data is not None:
            # A run.json with no finished stage is a stage 02 that was cut off: nothing in the folder is worth
            # keeping, and 02 refuses a non-empty folder without --overwrite.
            return Step(True, ["--overwrite"], "La etapa 02 no llegó a terminar: se empieza de nuevo.")
        return Step(True, [], "")
    if stage == "train":
        found, _ = checkpoints.newest_complete(layout.checkpoints)
        if found is not None:
            return Step(True, ["--resume"], f"El entrenamiento se interrumpió: continúa desde {found.name} "
                                            f"(paso {checkpoints.step_of(found)}).")
        return Step(True, [], "")
    return Step(True, [], "")


def announce(step: Step) -> bool:
    """Print why (when there is something to say) and return whether the stage runs."""
    if step.reason:
        print(step.reason, flush=True)
    return step.run
