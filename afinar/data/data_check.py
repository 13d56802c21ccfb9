"""Reading and validating a dataset file (JSON array or JSON Lines), reporting every problem at once.

Entries are Alpaca (`instruction`/`input`/`output`), ShareGPT (`conversations`: turns with `from`/`value`) or
chat `messages` (turns with `role`/`content`), single or multi-turn, told apart entry by entry.

Rules (documented in the README's data section):
- UTF-8 with or without BOM; `instruction` and `output` are required non-blank strings, `input` is optional
  (string or null), and so is `rejected` (the misconception answer, for preference training; it must differ from
  `output`). Other fields are ignored with a single notice.
- A field longer than MAX_FIELD_CHARS characters is rejected, not truncated: a cut answer would teach the
  model to stop mid-sentence, and no sensible max_seq_length fits that much text anyway.
- Control characters other than newline and tab are removed and \\r\\n / \\r become \\n, each with one notice.
- JSON Lines is read line by line with a bounded line length; a JSON array is decoded entry by entry from the
  file text, so no second copy of the data is built.
"""

from __future__ import annotations

import codecs
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afinar.core.errors import UserError

REQUIRED_FIELDS = ("instruction", "output")
# `rejected`: the wrong answer (the misconception) that preference training (afinar.train.preference) trains against.
OPTIONAL_FIELDS = ("input", "rejected")
KNOWN_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

MAX_FIELD_CHARS = 100_000
MAX_LISTED_PROBLEMS = 20
# No valid entry needs this much: 3 fields x 100,000 characters, even fully \\u-escaped, stays well below.
MAX_LINE_BYTES = 16 * 1024 * 1024

_BOM = codecs.BOM_UTF8
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _parse_int(digits: str) -> int | float:
    """Python refuses to convert integers of more than 4,300 digits (a ValueError that is no JSON error and
    used to escape as a traceback). Such a number becomes a float (inf), so the entry is still read and
    the field check reports it, with entry and field, like any other number where a text belongs."""
    try:
        return int(digits)
    except ValueError:
        return float(digits)


# strict=False accepts raw control characters inside strings, so they can be removed with a notice instead
# of rejecting an otherwise usable file.
_DECODER = json.JSONDecoder(strict=False, parse_int=_parse_int)

_JSON_MESSAGES = {
    "Expecting value": "se esperaba un valor",
    "Expecting ',' delimiter": "falta una coma",
    "Expecting ':' delimiter": "faltan los dos puntos tras el nombre del campo",
    "Expecting property name enclosed in double quotes": "se esperaba un nombre de campo entre comillas dobles",
    "Unterminated string starting at": "texto sin comillas de cierre",
    "Invalid \\escape": "secuencia de escape no válida",
    "Invalid \\uXXXX escape": "secuencia \\uXXXX no válida",
    "Extra data": "datos sobrantes después del final del JSON",
    "Unexpected UTF-8 BOM (decode using utf-8-sig)": "marca BOM inesperada",
}

_TYPE_NAMES = {
    bool: "un valor booleano",
    int: "un número",
    float: "un número",
    list: "una lista",
    dict: "un objeto",
    str: "un texto",
}


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """'1 entrada', '3 entradas' (Spanish thousands separator)."""
    word = singular if count == 1 else (plural_form or singular + "s")
    return f"{count:,}".replace(",", ".") + f" {word}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class Problems:
    """Collects problems; lists the first MAX_LISTED_PROBLEMS and counts the rest."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.listed: list[str] = []
        self.total = 0

    def add(self, where: str, what: str, field_name: str | None = None) -> None:
        self.total += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            prefix = f"{where}, campo «{field_name}»" if field_name else where
            self.listed.append(f"{prefix}: {what}")

    def __bool__(self) -> bool:
        return self.total > 0

    def message(self) -> str:
        noun = "problema" if self.total == 1 else "problemas"
        lines = [f"El archivo «{self.source}» no se puede usar para entrenar ({self.total} {noun}):"]
        lines += [f"  - {item}" for item in self.listed]
        rest = self.total - len(self.listed)
        if rest > 0:
            lines.append(f"  ... y {rest} problemas más (se muestran los {len(self.listed)} primeros).")
        return "\n".join(lines)

    def raise_if_any(self) -> None:
        if self.total:
            raise UserError(self.message())


@dataclass
class CheckStats:
    extra_fields: Counter = field(default_factory=Counter)
    control_chars_entries: int = 0
    newline_entries: int = 0
    with_input: int = 0

    def notices(self) -> list[str]:
        notes = []
        if self.extra_fields:
            names = ", ".join(
                f"«{name}» ({plural(count, 'entrada')})" for name, count in sorted(self.extra_fields.items())
            )
            notes.append(f"Se ignoran los campos no reconocidos: {names}.")
        if self.control_chars_entries:
            notes.append(
                "Se eliminaron caracteres de control invisibles en "
                f"{plural(self.control_chars_entries, 'entrada')}."
            )
        if self.newline_entries:
            notes.append(
                "Se normalizaron los saltos de línea (\\r\\n o \\r pasan a \\n) en "
                f"{plural(self.newline_entries, 'entrada')}."
            )
        return notes


@dataclass
class CheckedData:
    path: Path
    format: str  # "json" (array) or "jsonl"
    entries: list[dict[str, str]]
    notices: list[str]
    had_bom: bool = False
    with_input: int = 0


# --------------------------------------------------------------------------------------------------- fields


def clean_text(text: str) -> tuple[str, bool, bool]:
    """Normalise newlines and drop control characters; returns (text, removed_controls, normalised_newlines)."""
    newlines = "\r" in text
    if newlines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, removed = _CONTROL_CHARS.subn("", text)
    return text, removed > 0, newlines


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(text: str) -> int | None:
    found = _SURROGATE.search(text)
    return found.start() if found else None


def _check_text_field(
    record: dict, name: str, required: bool, where: str, problems: Problems
) -> tuple[str | None, bool, bool]:
    if name not in record:
        if required:
            problems.add(where, "falta el campo", name)
        return None, False, False
    value = record[name]
    if value is None:
        if required:
            problems.add(where, "es null; debe ser un texto", name)
        return None, False, False
    if not isinstance(value, str):
        problems.add(where, f"debe ser un texto y es {_type_name(value)}", name)
        return None, False, False
    surrogate = _lone_surrogate(value)
    if surrogate is not None:
        # An escape such as \ud800 decodes to a half of a UTF-16 pair that no UTF-8 file, tokenizer or JSON
        # writer accepts; it would fail much later, in the tokenizer or when run.json is written.
        problems.add(where, f"contiene un carácter no válido (U+{ord(value[surrogate]):04X}, la mitad de un par "
                            f"UTF-16 sin su pareja) en la posición {surrogate + 1}; quítalo o escribe el carácter "
                            f"completo", name)
        return None, False, False
    value, controls, newlines = clean_text(value)
    if len(value) > MAX_FIELD_CHARS:
        limit = plural(MAX_FIELD_CHARS, "carácter", "caracteres")
        problems.add(where, f"tiene {plural(len(value), 'carácter', 'caracteres')}; el máximo es {limit}", name)
        return None, False, False
    if required and not value.strip():
        problems.add(where, "está vacío", name)
        return None, False, False
    return value, controls, newlines


# Chat formats, detected per entry by their list field: ShareGPT's `conversations` (turns with `from`/`value`)
# and the `messages` of chat templates (turns with `role`/`content`).
CONVERSATION_FORMATS = {
    "conversations": ("from", "value", {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                                        "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                                        "model": "assistant", "system": "system"}),
    "messages": ("role", "content", {"user": "user", "assistant": "assistant", "system": "system"}),
}


def entry_format(record: Any) -> str:
    """"alpaca", "conversations" (ShareGPT) or "messages": what an entry looks like, decided by its fields."""
    if isinstance(record, dict):
        for key in CONVERSATION_FORMATS:
            if key in record and not any(name in record for name in REQUIRED_FIELDS):
                return key
    return "alpaca"


def _conversation_entry(record: dict, key: str, where: str, problems: Problems,
                        stats: CheckStats) -> dict[str, Any] | None:
    """A ShareGPT or `messages` entry as {instruction, input, output, turns}, or None after its problems.

    `instruction` and `output` are the first question and the last answer, so the checks written for Alpaca
    entries (lengths, language, the data report) keep working; `turns` is the whole conversation, and training
    puts the loss on every assistant turn of it (afinar.core.prompts.tokenize_example).
    """
    role_field, text_field, roles = CONVERSATION_FORMATS[key]
    turns = record[key]
    if not isinstance(turns, list):
        problems.add(where, f"debe ser una lista de turnos y es {_type_name(turns)}", key)
        return None
    if not turns:
        problems.add(where, "la lista de turnos está vacía", key)
        return None
    before = problems.total
    parsed: list[dict[str, str]] = []
    touched_controls = touched_newlines = False
    for number, turn in enumerate(turns):
        name = f"{key}[{number}]"
        if not isinstance(turn, dict):
            problems.add(where, f"el turno debe ser un objeto y es {_type_name(turn)}", name)
            continue
        role = turn.get(role_field)
        if not isinstance(role, str) or role.strip().lower() not in roles:
            shown = f"«{role}»" if isinstance(role, str) else _type_name(role)
            problems.add(where, f"el papel {shown} no se reconoce; usa uno de {', '.join(sorted(set(roles)))}",
                         f"{name}.{role_field}")
            continue
        value, controls, newlines = _check_text_field(turn, text_field, True, where, problems)
        if value is None:
            # _check_text_field names the bare field; say which turn it was.
            if problems.listed and problems.listed[-1].startswith(f"{where}, campo «{text_field}»"):
                problems.listed[-1] = problems.listed[-1].replace(f"campo «{text_field}»",
                                                                  f"campo «{name}.{text_field}»", 1)
            continue
        touched_controls |= controls
        touched_newlines |= newlines
        parsed.append({"role": roles[role.strip().lower()], "content": value})
    if problems.total > before:
        return None
    body = parsed[1:] if parsed[0]["role"] == "system" else parsed
    for number, turn in enumerate(body):
        expected = "user" if number % 2 == 0 else "assistant"
        if turn["role"] != expected:
            index = number + (len(parsed) - len(body))
            what = ("el sistema solo puede ir en el primer turno" if turn["role"] == "system" else
                    f"se esperaba un turno de {'usuario' if expected == 'user' else 'asistente'}: los turnos deben "
                    f"alternar usuario y asistente, empezando por el usuario")
            problems.add(where, what, f"{key}[{index}]")
            return None
    if len(body) < 2 or body[-1]["role"] != "assistant":
        problems.add(where, "la conversación debe terminar con una respuesta del asistente (falta el último turno "
                            "de asistente)", key)
        return None
    for name in record:
        if name != key:
            stats.extra_fields[name.encode("utf-8", "backslashreplace").decode("utf-8")] += 1
    stats.control_chars_entries += touched_controls
    stats.newline_entries += touched_newlines
    entry: dict[str, Any] = {"instruction": body[0]["content"], "input": "", "output": body[-1]["content"]}
    if len(parsed) > 2:  # a system turn of its own, or several exchanges: the whole conversation is trained
        entry["turns"] = parsed
    return entry


def validate_record(record: Any, where: str, problems: Problems, stats: CheckStats) -> dict[str, str] | None:
    """Return the normalised entry {instruction, input, output[, turns]}, or None after recording its problems.

    Alpaca, ShareGPT and `messages` entries are told apart entry by entry (entry_format); a single-turn
    conversation becomes a plain Alpaca entry, so it is trained, deduplicated and measured exactly like one.
    """
    if not isinstance(record, dict):
        problems.add(where, f"la entrada no es un objeto JSON, es {_type_name(record)}")
        return None
    kind = entry_format(record)
    if kind != "alpaca":
        return _conversation_entry(record, kind, where, problems, stats)
    before = problems.total
    values = {}
    touched_controls = touched_newlines = False
    for name in KNOWN_FIELDS:
        value, controls, newlines = _check_text_field(record, name, name in REQUIRED_FIELDS, where, problems)
        values[name] = value
        touched_controls |= controls
        touched_newlines |= newlines
    for name in record:
        if name not in KNOWN_FIELDS:
            # The name is printed in a notice: a lone surrogate in it could not be written to the terminal.
            stats.extra_fields[name.encode("utf-8", "backslashreplace").decode("utf-8")] += 1
    if problems.total > before:
        return None
    stats.control_chars_entries += touched_controls
    stats.newline_entries += touched_newlines
    input_text = values["input"] or ""
    if input_text.strip():
        stats.with_input += 1
    entry = {"instruction": values["instruction"], "input": input_text, "output": values["output"]}
    if values["rejected"] and values["rejected"].strip():
        if values["rejected"].strip() == values["output"].strip():
            problems.add(where, "es igual que 'output': debe ser la respuesta equivocada", "rejected")
            return None
        entry["rejected"] = values["rejected"]
    return entry


# --------------------------------------------------------------------------------------------------- JSON


def spanish_json_error(err: json.JSONDecodeError) -> str:
    return _JSON_MESSAGES.get(err.msg, f"JSON no válido ({err.msg})")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _syntax_problem(text: str, err: json.JSONDecodeError, problems: Problems, what: str | None = None) -> None:
    line, col = _line_col(text, err.pos)
    if what is None:
        what = spanish_json_error(err)
        # With strict=False an unterminated string runs to the end of the file, so both mean a cut file.
        if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string"):
            what += "; el archivo termina a mitad de una entrada (¿está truncado?)"
    problems.add(f"línea {line}, columna {col}", f"JSON no válido: {what}")


def _iter_array(text: str, start: int, problems: Problems) -> Iterator[tuple[str, Any]]:
    """Yield (position, value) for each element of the top-level array starting at text[start] == '['.

    Element by element (json's own raw_decode for each value) rather than one json.loads: the messages name
    each entry's line ("entrada 7 (línea 45)"), and the field problems of the entries before a syntax error
    are reported together with it, which one json.loads cannot give (it returns all or nothing). Measured on a
    43 MB array of 100,000 entries: 0.67 s against 0.37 s for json.loads, the same 129 MB peak.
    """
    idx = _JSON_WHITESPACE.match(text, start + 1).end()
    if text.startswith("]", idx):
        _check_trailing(text, idx + 1, problems)
        return
    number, line, counted_to = 0, 1, 0
    while True:
        try:
            value, end = _DECODER.raw_decode(text, idx)
        except json.JSONDecodeError as err:
            _syntax_problem(text, err, problems)
            return
        except RecursionError:
            line, col = _line_col(text, idx)
            problems.add(f"línea {line}, columna {col}", "JSON con demasiados niveles de anidamiento")
            return
        number += 1
        line += text.count("\n", counted_to, idx)
        counted_to = idx
        yield f"entrada {number} (línea {line})", value
        idx = _JSON_WHITESPACE.match(text, end).end()
        sep = text[idx : idx + 1]
        if sep == ",":
            idx = _JSON_WHITESPACE.match(text, idx + 1).end()
            if text.startswith("]", idx):
                _syntax_problem(text, json.JSONDecodeError("", text, idx), problems, "coma sobrante antes de «]»")
                return
        elif sep == "]":
            _check_trailing(text, idx + 1, problems)
            return
        elif sep == "":
            _syntax_problem(
                text, json.JSONDecodeError("", text, idx), problems,
                "la lista no se cierra con «]»; el archivo parece truncado",
            )
            return
        else:
            _syntax_problem(text, json.JSONDecodeError("", text, idx), problems, "falta una coma entre entradas")
            return


def _check_trailing(text: str, idx: int, problems: Problems) -> None:
    idx = _JSON_WHITESPACE.match(text, idx).end()
    if idx < len(text):
        _syntax_problem(text, json.JSONDecodeError("", text, idx), problems, "datos sobrantes después de «]»")


# --------------------------------------------------------------------------------------------------- encoding


_bad_offsets_lock = threading.Lock()
_bad_offsets: list[int] = []


def _record_bad_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    _bad_offsets.append(err.start)
    return "\ufffd", err.end


codecs.register_error("afinar.record_bad_utf8", _record_bad_byte)


def _decode_reporting(data: bytes, start: int, problems: Problems) -> str:
    """Decode data[start:] as UTF-8; every invalid byte sequence becomes a problem with its file offset.

    A memoryview skips the BOM without copying the whole file once more.
    """
    view = memoryview(data)[start:]
    try:
        return codecs.decode(view, "utf-8")
    except UnicodeDecodeError:
        pass
    with _bad_offsets_lock:
        _bad_offsets.clear()
        text = codecs.decode(view, "utf-8", "afinar.record_bad_utf8")
        offsets = [start + offset for offset in _bad_offsets]
    line, counted_to = 1, 0
    for offset in offsets:
        line += data.count(b"\n", counted_to, offset)
        counted_to = offset
        problems.add(
            f"byte {offset} (línea {line})",
            f"bytes que no son UTF-8 válido (0x{data[offset]:02x}); guarda el archivo con codificación UTF-8",
        )
    return text


# --------------------------------------------------------------------------------------------------- readers

RecordHook = Callable[[Any], Any]
Consumer = Callable[[Any, str], None]


def _read_array(data: bytes, bom: int, problems: Problems, consume: Consumer) -> None:
    text = _decode_reporting(data, bom, problems)
    del data  # only the text remains while the entries are built
    start = _JSON_WHITESPACE.match(text).end()
    for where, record in _iter_array(text, start, problems):
        consume(record, where)


def _read_line_bounded(handle, limit: int) -> tuple[bytes, bool]:
    """One line of at most `limit` bytes; an over-long line is consumed and reported as too long."""
    line = handle.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    while True:
        rest = handle.readline(1024 * 1024)
        if not rest or rest.endswith(b"\n"):
            return b"", True


def _read_jsonl(path: Path, problems: Problems, consume: Consumer, bom: int) -> bool:
    """Returns whether line 1 was a JSON syntax error, as it is in a pretty-printed single object."""
    first_line_broken = False
    with open(path, "rb") as handle:
        handle.seek(bom)
        offset, number = bom, 0
        while True:
            start_offset = offset
            raw, too_long = _read_line_bounded(handle, MAX_LINE_BYTES)
            offset = handle.tell()
            if not raw and not too_long:
                break
            number += 1
            where = f"línea {number}"
            if too_long:
                problems.add(where, f"la línea ocupa más de {MAX_LINE_BYTES // (1024 * 1024)} MiB")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.add(
                    f"{where} (byte {start_offset + err.start})",
                    "bytes que no son UTF-8 válido; guarda el archivo con codificación UTF-8",
                )
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                record = _DECODER.decode(line)
            except json.JSONDecodeError as err:
                what = spanish_json_error(err)
                if err.pos >= len(line.rstrip()) or err.msg.startswith("Unterminated string"):
                    what = f"línea truncada: termina a mitad de un objeto JSON ({what})"
                problems.add(f"{where}, columna {err.colno}", f"JSON no válido: {what}")
                first_line_broken |= number == 1
                continue
            except RecursionError:
                problems.add(where, "JSON con demasiados niveles de anidamiento")
                continue
            consume(record, where)
    return first_line_broken


def _looks_like_single_object(path: Path, bom: int) -> bool:
    if path.stat().st_size > 64 * 1024 * 1024:
        return False
    try:
        return isinstance(json.loads(path.read_bytes()[bom:].decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


def _first_char(path: Path) -> tuple[str, int, bytes]:
    """First non-blank character, BOM length, and the raw head of the file (for UTF-16 detection)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
        bom = len(_BOM) if head.startswith(_BOM) else 0
        chunk = head[bom:]
        while True:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return chr(stripped[0]), bom, head
            chunk = handle.read(1024 * 1024)
            if not chunk:
                return "", bom, head


def _parse_file(path: Path, consume: _Validator | _Collector) -> tuple[str, int]:
    """Feed every top-level record of `path` to consume(record, position); returns (format, BOM length).

    Raises UserError for a missing or empty file and, after reading everything, for every syntax,
    encoding or field problem recorded (consume records field problems in the same Problems object).
    """
    source = str(path)
    if not path.exists():
        raise UserError(f"No existe el archivo de datos «{source}».")
    if path.is_dir():
        raise UserError(f"«{source}» es una carpeta; se esperaba un archivo .json o .jsonl.")
    try:
        first, bom, head = _first_char(path)
    except OSError as err:
        raise UserError(f"No se puede leer «{source}»: {err.strerror}.") from None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"«{source}», byte 0: el archivo está en UTF-16; guárdalo con codificación UTF-8.")
    if not first:
        raise UserError(f"El archivo «{source}» está vacío: no contiene ninguna entrada.")
    if first == "[":
        _read_array(path.read_bytes(), bom, consume.problems, consume)
        return "json", bom
    first_line_broken = _read_jsonl(path, consume.problems, consume, bom)
    if first_line_broken and _looks_like_single_object(path, bom):
        raise UserError(
            f"El archivo «{source}» contiene un único objeto JSON; se esperaba una lista de entradas "
            "([{...}, {...}]) o JSON Lines (un objeto por línea)."
        )
    return "jsonl", bom


class _Validator:
    def __init__(self, source: str, hook: RecordHook | None) -> None:
        self.problems = Problems(source)
        self.stats = CheckStats()
        self.hook = hook
        self.entries: list[dict[str, str]] = []

    def __call__(self, record: Any, where: str) -> None:
        entry = validate_record(self.hook(record) if self.hook else record, where, self.problems, self.stats)
        if entry is not None:
            self.entries.append(entry)


class _Collector:
    def __init__(self, source: str, hook: RecordHook | None) -> None:
        self.problems = Problems(source)
        self.hook = hook
        self.records: list[Any] = []

    def __call__(self, record: Any, where: str) -> None:
        self.records.append(self.hook(record) if self.hook else record)


def _read_all(path: Path, consume: _Validator | _Collector) -> tuple[str, int]:
    """_parse_file, then every problem it recorded raised at once, or the lack of any entry."""
    fmt, bom = _parse_file(path, consume)
    consume.problems.raise_if_any()
    if not (consume.entries if isinstance(consume, _Validator) else consume.records):
        raise _no_entries(str(path), fmt)
    return fmt, bom


def _no_entries(source: str, fmt: str) -> UserError:
    kind = "la lista está vacía" if fmt == "json" else "no tiene ninguna línea con datos"
    return UserError(f"El archivo «{source}» no contiene entradas: {kind}.")


def read_dataset(path: str | Path, hook: RecordHook | None = None) -> CheckedData:
    """Read and validate `path`; raise UserError listing every problem (the first 20 and a count).

    `hook` maps each raw record before validation.
    """
    path = Path(path)
    validator = _Validator(str(path), hook)
    fmt, bom = _read_all(path, validator)
    return CheckedData(
        path=path,
        format=fmt,
        entries=validator.entries,
        notices=validator.stats.notices(),
        had_bom=bom > 0,
        with_input=validator.stats.with_input,
    )


def read_records(path: str | Path, hook: RecordHook | None = None) -> list[Any]:
    """Raw records of a JSON/JSONL file, unvalidated; syntax and encoding problems still raise UserError."""
    collector = _Collector(str(path), hook)
    _read_all(Path(path), collector)
    return collector.records


def validate_records(records, source: str, label: str = "fila") -> tuple[list[dict[str, str]], list[str], Problems]:
    """Validate already-parsed records (Hub rows); problems are returned, not raised, so the caller decides."""
    problems = Problems(source)
    stats = CheckStats()
    entries = []
    for number, record in enumerate(records, start=1):
        entry = validate_record(record, f"{label} {number}", problems, stats)
        if entry is not None:
            entries.append(entry)
    return entries, stats.notices(), problems
