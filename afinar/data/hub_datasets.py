"""Extra Spanish instruction sets from the Hugging Face Hub, or a local copy of one.

`--hub-dataset NAME[:N]`: NAME is one of KNOWN_HUB_SETS or a local path (.json/.jsonl/.parquet/.csv file or
a folder written by `Dataset.save_to_disk`); N keeps the first N rows after a shuffle with the seed.

Column names: bertin-project/alpaca-spanish and plncmm/spanish-alpaca publish instruction/input/output in
their dataset cards (plncmm adds a `text` column, ignored). saillab/alpaca-spanish-cleaned could not be
checked from here and is assumed to follow the same Alpaca layout; every source is also mapped through
COLUMN_ALIASES, so copies with Spanish or chat-style column names load too.

Rows go through the same validation as the local file, but an invalid Hub row is skipped with a notice
instead of stopping the run: the user cannot fix someone else's data set. A local file that cannot be parsed
at all is still an error.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from afinar.core.errors import UserError
from afinar.data.data_check import plural, read_records, validate_records


@dataclass(frozen=True)
class HubSet:
    split: str
    columns: dict[str, str]  # source column -> our field


_ALPACA = {"instruction": "instruction", "input": "input", "output": "output"}
KNOWN_HUB_SETS: dict[str, HubSet] = {
    "bertin-project/alpaca-spanish": HubSet("train", _ALPACA),
    "plncmm/spanish-alpaca": HubSet("train", _ALPACA),
    "saillab/alpaca-spanish-cleaned": HubSet("train", _ALPACA),
}

COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "instruccion", "instrucción", "prompt", "question", "pregunta"),
    "input": ("input", "entrada", "context", "contexto"),
    "output": ("output", "respuesta", "response", "salida", "answer", "completion"),
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class HubSpec:
    name: str
    limit: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.limit is None else f"{self.name}:{self.limit}"


@dataclass
class HubEntries:
    spec: HubSpec
    entries: list[dict[str, str]]
    available: int  # rows in the source (valid or not), before the limit
    invalid: int  # rows skipped by validation
    notices: list[str] = field(default_factory=list)


def parse_hub_spec(text: str) -> HubSpec:
    """"NAME" or "NAME:N"; a colon followed by something that is not a number stays part of NAME."""
    name, sep, tail = text.strip().rpartition(":")
    if sep and tail.isdigit() and name:
        limit = int(tail)
        if limit <= 0:
            raise UserError(f"--hub-dataset {text}: el número de entradas debe ser mayor que cero.")
        return HubSpec(name, limit)
    if sep and tail.startswith("-") and tail[1:].isdigit():
        raise UserError(f"--hub-dataset {text}: el número de entradas debe ser mayor que cero.")
    return HubSpec(text.strip())


def map_columns(record, columns: dict[str, str] | None = None):
    """Rename a raw row's columns to instruction/input/output (known mapping first, then aliases).

    Columns that map to none of them are kept, so the extra-field notice still names them.
    """
    if not isinstance(record, dict):
        return record
    mapped: dict = {}
    consumed: set = set()
    for source, target in (columns or {}).items():
        if source in record and target not in mapped:
            mapped[target] = record[source]
            consumed.add(source)
    by_lower_name = {str(key).strip().lower(): key for key in record}
    for target, aliases in COLUMN_ALIASES.items():
        if target in mapped:
            continue
        for alias in aliases:
            key = by_lower_name.get(alias)
            if key is not None and key not in consumed:
                mapped[target] = record[key]
                consumed.add(key)
                break
    for key, value in record.items():
        if key not in consumed and key not in mapped:
            mapped[key] = value
    return mapped


def _is_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_VARS)


def _library_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_copy_hint(name: str) -> str:
    stem = name.rsplit("/", 1)[-1]
    return (
        "Descárgalo en una máquina con conexión con:\n"
        f"  python -c \"from datasets import load_dataset; load_dataset('{name}', split='train')"
        f".to_json('{stem}.jsonl')\"\n"
        f"y pasa la copia local: --hub-dataset {stem}.jsonl (admite .json, .jsonl, .parquet, .csv o una "
        "carpeta guardada con save_to_disk; añade :N para usar solo N entradas)."
    )


def _offline_error(name: str, reason: str) -> UserError:
    return UserError(f"No se puede descargar «{name}» del Hub de Hugging Face: {reason}.\n{_local_copy_hint(name)}")


def _rows_from_hub(name: str) -> list[dict]:
    known = KNOWN_HUB_SETS.get(name)
    if known is None:
        names = ", ".join(sorted(KNOWN_HUB_SETS))
        raise UserError(
            f"«{name}» no es un archivo local ni un conjunto conocido del Hub. Conjuntos conocidos: {names}. "
            "Para otro conjunto, descárgalo y pasa la ruta del archivo (sus columnas deben llamarse "
            "instruction/input/output o equivalentes como instruccion/entrada/respuesta)."
        )
    offline = _is_offline()
    if offline and not _library_offline():
        # The variable was set after huggingface_hub was imported: the library would still go to the
        # network and retry for about half a minute, so do not call it.
        raise _offline_error(name, "el modo sin conexión está activado (HF_HUB_OFFLINE)")
    if not offline and not _hub_reachable():
        raise _offline_error(name, "no hay conexión de red con el Hub")
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=known.split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        reason = "el modo sin conexión está activado (HF_HUB_OFFLINE) y no hay copia en la caché" if offline else (
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise _offline_error(name, reason) from None
    return [map_columns(row, known.columns) for row in dataset]


def _rows_from_local(path: Path) -> list[dict]:
    try:
        if path.is_dir():
            import datasets

            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
            return [map_columns(row) for row in dataset]
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return [map_columns(row) for row in pq.read_table(path).to_pylist()]
        if path.suffix.lower() == ".csv":
            import csv

            with open(path, newline="", encoding="utf-8-sig") as handle:
                return [map_columns(row) for row in csv.DictReader(handle)]
    except UserError:
        raise
    except Exception as err:  # a damaged parquet/arrow/csv file: tell the user which and why
        raise UserError(f"No se puede leer el conjunto local «{path}»: {type(err).__name__}: {err}") from None
    raise UserError(f"Formato no admitido para «{path}»: usa .json, .jsonl, .parquet, .csv o una carpeta save_to_disk.")


def _sample(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:limit]]


def load_hub_entries(spec: HubSpec, seed: int = 42) -> HubEntries:
    """Rows of one --hub-dataset, validated; invalid rows are skipped and counted."""
    path = Path(spec.name).expanduser()
    is_local = path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or spec.name.startswith((".", "/", "~"))
    if is_local and not path.exists():
        raise UserError(f"No existe el conjunto local «{spec.name}» (--hub-dataset).")
    if is_local and path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        # Our own reader: exact line/entry positions for syntax errors; the hook renames alias columns.
        rows = read_records(path, hook=map_columns)
    else:
        rows = _rows_from_local(path) if is_local else _rows_from_hub(spec.name)
    entries, notices, problems = validate_records(rows, spec.name)
    notices = [f"«{spec.name}»: {notice[0].lower()}{notice[1:]}" for notice in notices]
    available = len(rows)
    del rows
    if problems:
        first = "; ".join(problems.listed[:3])
        skipped = plural(problems.total, "fila no válida", "filas no válidas")
        verb = "se omite" if problems.total == 1 else "se omiten"
        notices.append(f"«{spec.name}»: {verb} {skipped} (p. ej. {first}).")
    if not entries:
        raise UserError(f"El conjunto «{spec.name}» no tiene ninguna fila válida con instruction y output.")
    entries = _sample(entries, spec.limit, seed)
    return HubEntries(spec=spec, entries=entries, available=available, invalid=problems.total, notices=notices)
