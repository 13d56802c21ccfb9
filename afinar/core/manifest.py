"""run.json: the only state the stages share. Every write is atomic, every read is checked against the schema.

Schema, version 1 (the `schema` field; a newer number was written by a newer afinar and is refused):

    schema             int, 1
    created_at         text (optional)
    model              object: base_model (text), base_path (text), backend ("hf" | "unsloth"), load_in_4bit (bool)
    settings           object: every key of settings.LOAD_KEYS and settings.TRAIN_KEYS, each within the range of
                       its command-line option (afinar.core.validation.RULES); `precision` optional. A key whose
                       rule allows null ("automatic") may be missing (a run.json from before the key existed)
    generation         object (optional): max_new_tokens (int), batch_size (int), repetition_penalty (number)
    questions_file     text (optional)
    probe_file         text or null (optional): the misconception probe's pairs (afinar.evaluate.probe)
    system_prompt      text (optional): the system prompt of every conversation (02's --system-prompt); missing
                       in a run.json from before it existed, which means the default (afinar.core.prompts)
    stages             object: "load" | "train" | "export" -> object with status "done" and finished_at (text)
    train_in_progress  object (optional): a stage 03 that started and has not finished yet
    pushes             list (optional)

A damaged or foreign file is refused with a message that names the field and what to do, never a traceback:
the stages index these fields directly.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from afinar.core import atomic, settings, validation
from afinar.core.cli import quoted
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout

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
            f"--output-dir {quoted(layout.root)}) para crear el directorio de salida."
        )
    redo = f"Vuelve a ejecutar la etapa 02 con --overwrite (python 02_load_model.py --output-dir {quoted(layout.root)} --overwrite)."
    if path.is_dir():
        raise UserError(f"{path} es una carpeta; debe ser el archivo JSON que escribe la etapa 02. {redo}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} está dañado: no es UTF-8 (byte {err.start}). {redo}") from None
    except OSError as err:
        raise UserError(f"No se puede leer {path}: {err.strerror}. Revisa sus permisos.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} está dañado: JSON no válido en la línea {err.lineno}, columna {err.colno}. {redo}") from None
    except (ValueError, RecursionError):
        # Python refuses integers of more than 4,300 digits, and very deep nesting, with other errors.
        raise UserError(f"{path} está dañado: contiene un número demasiado largo o un anidamiento excesivo. {redo}") from None
    why = schema_problem(data)
    if why:
        raise UserError(f"{path} no es un manifiesto válido de afinar: {why}. Corrige ese campo o {redo[0].lower()}{redo[1:]}")
    return data


SCHEMA_VERSION = 1
_STAGE_RECORD_TEXT = ("finished_at",)


def _kind(value: Any) -> str:
    return {dict: "un objeto", list: "una lista", str: "un texto", bool: "un booleano", type(None): "null"}.get(
        type(value), "un número")


def schema_problem(data: Any) -> str | None:
    """The first field of `data` that breaks the schema above, as 'el campo «x.y» ...', or None."""
    if not isinstance(data, dict):
        return f"el contenido debe ser un objeto JSON y es {_kind(data)}"
    if "schema" not in data:
        return "falta el campo «schema»"
    version = data["schema"]
    if isinstance(version, bool) or not isinstance(version, int):
        return f"el campo «schema» debe ser el número {SCHEMA_VERSION} y es {_kind(version)}"
    if version != SCHEMA_VERSION:
        newer = " (lo escribió una versión más nueva de afinar: actualízala)" if version > SCHEMA_VERSION else ""
        return f"el campo «schema» vale {validation._shown(version)} y esta versión lee el {SCHEMA_VERSION}{newer}"
    for name in ("model", "settings", "stages"):
        if name not in data:
            return f"falta el campo «{name}»"
        if not isinstance(data[name], dict):
            return f"el campo «{name}» debe ser un objeto y es {_kind(data[name])}"
    model = data["model"]
    for key, rule in (("base_model", "model"), ("base_path", "base_path"), ("backend", "backend"),
                      ("load_in_4bit", "load_in_4bit")):
        if key not in model:
            return f"falta el campo «model.{key}»"
        why = validation.problem(rule, model[key])
        if why:
            return f"el campo «model.{key}»: {why}"
    recorded = data["settings"]
    for key in settings.LOAD_KEYS + settings.TRAIN_KEYS + ("precision",):
        rule = validation.RULES[key]
        if key not in recorded:
            if rule.nullable or key == "precision":
                continue
            return f"falta el campo «settings.{key}»"
        why = validation.problem(key, recorded[key])
        if why:
            return f"el campo «settings.{key}»: {why}"
    for name, record in data["stages"].items():
        if name not in STAGE_SCRIPTS:
            return f"el campo «stages» tiene una etapa desconocida «{validation._shown(name)}»"
        if not isinstance(record, dict):
            return f"el campo «stages.{name}» debe ser un objeto y es {_kind(record)}"
        if record.get("status") != "done":
            return f"el campo «stages.{name}.status» debe ser \"done\""
        for key in _STAGE_RECORD_TEXT:
            if not isinstance(record.get(key), str):
                return f"el campo «stages.{name}.{key}» debe ser un texto"
    generation = data.get("generation", {})
    if not isinstance(generation, dict):
        return f"el campo «generation» debe ser un objeto y es {_kind(generation)}"
    for key, rule in (("max_new_tokens", "max_new_tokens"), ("batch_size", "gen_batch_size"),
                      ("repetition_penalty", "repetition_penalty")):
        if key in generation:
            why = validation.problem(rule, generation[key])
            if why:
                return f"el campo «generation.{key}»: {why}"
    if "system_prompt" in data:
        why = validation.problem("system_prompt", data["system_prompt"])
        if why:
            return f"el campo «system_prompt»: {why}"
    if data.get("probe_file") is not None and not isinstance(data["probe_file"], str):
        return f"el campo «probe_file» debe ser un texto o null y es {_kind(data['probe_file'])}"
    for key, kind in (("questions_file", str), ("created_at", str), ("train_in_progress", dict), ("pushes", list)):
        if key in data and not isinstance(data[key], kind):
            return f"el campo «{key}» debe ser {_kind(kind())} y es {_kind(data[key])}"
    return None


def write(layout: OutputLayout, manifest: dict[str, Any]) -> None:
    manifest["updated_at"] = now_iso()
    atomic.write_json(layout.manifest, manifest)


def finished(manifest: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The record of `stage` if it finished ("done"), else None."""
    record = manifest.get("stages", {}).get(stage)
    return record if isinstance(record, dict) and record.get("status") == "done" else None


def require_stage(manifest: dict[str, Any], stage: str, layout: OutputLayout) -> dict[str, Any]:
    """Return the record of a finished stage, or explain which script to run first."""
    record = finished(manifest, stage)
    if record is None:
        raise UserError(
            f"Falta la etapa '{stage}' en {layout.manifest}: ejecuta antes "
            f"python {STAGE_SCRIPTS[stage]} --output-dir {quoted(layout.root)}"
        )
    return record


def record_stage(layout: OutputLayout, manifest: dict[str, Any], stage: str, **fields: Any) -> None:
    manifest.setdefault("stages", {})[stage] = {"status": "done", "finished_at": now_iso(), **fields}
    write(layout, manifest)


def relative(layout: OutputLayout, path: Path) -> str:
    """Paths in run.json are relative, so the folder can be moved or zipped whole."""
    return str(Path(path).relative_to(layout.root))
