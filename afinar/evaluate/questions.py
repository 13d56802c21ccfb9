"""The contrast questions file (`preguntas_contraste.json`): loading and validation.

Format: a JSON array of objects `{"pregunta": str, "palabras_clave": [str, ...], "referencia": str,
"hecho": {"descripcion": str, "afirma": [regex, ...], "error": [regex, ...]}}`; all but `pregunta` are
optional. `hecho` is the corrected fact the answer must state, and the error it must not (afinar.evaluate.facts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from afinar.core.errors import UserError
from afinar.data.data_check import spanish_json_error

REQUIRED_FIELD = "pregunta"
OPTIONAL_FIELDS = ("palabras_clave", "referencia", "hecho")
KNOWN_FIELDS = (REQUIRED_FIELD, *OPTIONAL_FIELDS)

_FORMAT_HINT = (
    'Formato esperado: una lista JSON de objetos {"pregunta": "...", "palabras_clave": ["...", ...], '
    '"referencia": "..."} (palabras_clave y referencia son opcionales).'
)


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate the questions file.

    Returns one dict per entry, always with the three keys: `pregunta` (stripped str),
    `palabras_clave` (list of stripped str, possibly empty) and `referencia` (str or None).
    Raises UserError (Spanish, naming file, entry number and field) for any problem.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: el contenido debe ser una lista JSON de preguntas y es {_json_type(data)}. "
                        f"{_FORMAT_HINT}")
    if not data:
        raise UserError(f"{path}: la lista de preguntas está vacía; hace falta al menos una. {_FORMAT_HINT}")
    questions = [_validate_entry(path, number, entry) for number, entry in enumerate(data, start=1)]
    _reject_duplicates(path, questions)
    return questions


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"No existe el fichero de preguntas {path}. Indícalo con --questions o créalo. "
                        f"{_FORMAT_HINT}")
    if not path.is_file():
        raise UserError(f"{path} no es un fichero: el fichero de preguntas debe ser un JSON.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} no está codificado en UTF-8 (byte {err.start}). Guárdalo como UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} no es un JSON válido: {spanish_json_error(err)} (línea {err.lineno}, columna "
                        f"{err.colno}).") from None
    except (ValueError, RecursionError):  # an integer of more than 4,300 digits, or absurd nesting
        raise UserError(f"{path} no es un JSON utilizable: contiene un número demasiado largo o demasiados niveles "
                        f"de anidamiento.") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _validate_entry(path: Path, number: int, entry: Any) -> dict[str, Any]:
    where = f"{path}, entrada {number}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: cada entrada debe ser un objeto JSON y esta es {_json_type(entry)}. {_FORMAT_HINT}")
    unknown = [key for key in entry if key not in KNOWN_FIELDS]
    if unknown:
        # A typo such as "palabras clave" would otherwise silently drop the keyword check.
        raise UserError(f"{where}: campo desconocido '{unknown[0]}'. Los campos válidos son: "
                        f"{', '.join(KNOWN_FIELDS)}.")
    if REQUIRED_FIELD not in entry:
        raise UserError(f"{where}: falta el campo obligatorio 'pregunta'.")
    for name, value in entry.items():
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and _SURROGATE.search(text) for text in texts):
            # Half of a UTF-16 pair (an escape such as \ud800): the tokenizer and the UTF-8 writers reject it.
            raise UserError(f"{where}, campo '{name}': contiene un carácter no válido (la mitad de un par UTF-16 "
                            f"sin su pareja, p. ej. \\ud800); quítalo o escribe el carácter completo.")
    question = entry[REQUIRED_FIELD]
    if not isinstance(question, str):
        raise UserError(f"{where}, campo 'pregunta': debe ser un texto y es {_json_type(question)}.")
    if not question.strip():
        raise UserError(f"{where}, campo 'pregunta': está vacío.")
    return {
        "pregunta": question.strip(),
        "palabras_clave": _validate_keywords(where, entry.get("palabras_clave")),
        "referencia": _validate_reference(where, entry.get("referencia")),
        "hecho": _validate_fact(where, entry.get("hecho")),
    }


def _validate_fact(where: str, fact: Any) -> dict[str, Any] | None:
    import re

    if fact is None:
        return None
    if not isinstance(fact, dict):
        raise UserError(f"{where}, campo 'hecho': debe ser un objeto y es {_json_type(fact)}.")
    checked: dict[str, Any] = {"descripcion": fact.get("descripcion") or ""}
    if not isinstance(checked["descripcion"], str):
        raise UserError(f"{where}, campo 'hecho.descripcion': debe ser un texto.")
    for key in ("afirma", "error"):
        patterns = fact.get(key, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise UserError(f"{where}, campo 'hecho.{key}': debe ser una lista de expresiones regulares (textos).")
        for position, pattern in enumerate(patterns, start=1):
            try:
                re.compile(pattern)
            except re.error as err:
                raise UserError(f"{where}, campo 'hecho.{key}', elemento {position}: expresión regular no "
                                f"válida ({err}).") from None
        checked[key] = patterns
    if not checked["afirma"]:
        raise UserError(f"{where}, campo 'hecho.afirma': hace falta al menos una expresión del hecho correcto.")
    return checked


def _validate_keywords(where: str, keywords: Any) -> list[str]:
    if keywords is None:
        return []
    if not isinstance(keywords, list):
        raise UserError(f"{where}, campo 'palabras_clave': debe ser una lista de textos y es {_json_type(keywords)}.")
    cleaned = []
    for position, keyword in enumerate(keywords, start=1):
        if not isinstance(keyword, str):
            raise UserError(f"{where}, campo 'palabras_clave', elemento {position}: debe ser un texto y es "
                            f"{_json_type(keyword)}.")
        if not keyword.strip():
            raise UserError(f"{where}, campo 'palabras_clave', elemento {position}: está vacío.")
        cleaned.append(keyword.strip())
    return cleaned


def _validate_reference(where: str, reference: Any) -> str | None:
    if reference is None:
        return None
    if not isinstance(reference, str):
        raise UserError(f"{where}, campo 'referencia': debe ser un texto y es {_json_type(reference)}.")
    return reference.strip() or None


def _reject_duplicates(path: Path, questions: list[dict[str, Any]]) -> None:
    # Answers are matched to questions by text between stages 02 and 04, so each must be unique.
    first_seen: dict[str, int] = {}
    for number, question in enumerate(questions, start=1):
        key = " ".join(question["pregunta"].split()).casefold()
        if key in first_seen:
            raise UserError(f"{path}, entrada {number}, campo 'pregunta': repite la pregunta de la entrada "
                            f"{first_seen[key]}.")
        first_seen[key] = number


def question_text(question: str | dict[str, Any]) -> str:
    """The text of a question given as a plain string or as a loaded entry."""
    if isinstance(question, dict):
        return question["pregunta"]
    return question


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "un booleano"
    if isinstance(value, (int, float)):
        return "un número"
    if isinstance(value, str):
        return "un texto"
    if isinstance(value, list):
        return "una lista"
    if isinstance(value, dict):
        return "un objeto"
    return type(value).__name__
