"""run.json: the only state the stages share. Every write is atomic."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import atomic
from .errors import UserError
from .layout import OutputLayout

STAGE_SCRIPTS = {
    "load": "02_load_model.py",
    "train": "03_train_model.py",
    "export": "04_inference_and_export.py",
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read(layout: OutputLayout) -> dict[str, Any]:
    path = layout.manifest
    if not path.exists():
        raise UserError(
            f"No existe {path}. Ejecuta primero la etapa 02 (python 02_load_model.py "
            f"--output-dir {layout.root}) para crear el directorio de salida."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} está dañado ({err}). Vuelve a ejecutar la etapa 02 con --overwrite.") from None
    if not isinstance(data, dict) or "stages" not in data:
        raise UserError(f"{path} no es un manifiesto de afinar (falta el campo 'stages').")
    return data


def write(layout: OutputLayout, manifest: dict[str, Any]) -> None:
    manifest["updated_at"] = now_iso()
    atomic.write_json(layout.manifest, manifest)


def require_stage(manifest: dict[str, Any], stage: str, layout: OutputLayout) -> dict[str, Any]:
    """Return the record of a finished stage, or explain which script to run first."""
    record = manifest.get("stages", {}).get(stage)
    if not record or record.get("status") != "done":
        raise UserError(
            f"Falta la etapa '{stage}' en {layout.manifest}: ejecuta antes "
            f"python {STAGE_SCRIPTS[stage]} --output-dir {layout.root}"
        )
    return record


def record_stage(layout: OutputLayout, manifest: dict[str, Any], stage: str, **fields: Any) -> None:
    manifest.setdefault("stages", {})[stage] = {"status": "done", "finished_at": now_iso(), **fields}
    write(layout, manifest)


def relative(layout: OutputLayout, path: Path) -> str:
    """Paths in run.json are relative, so the folder can be moved or zipped whole."""
    return str(Path(path).relative_to(layout.root))
