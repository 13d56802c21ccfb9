"""The contrast questions file: a valid file loads, every kind of mistake is a Spanish UserError with its place."""

import json
from pathlib import Path

import pytest

from afinar.core.errors import UserError
from afinar.evaluate.questions import load_questions

REPO_QUESTIONS = Path(__file__).resolve().parent.parent / "preguntas_contraste.json"


def write(tmp_path, content) -> Path:
    path = tmp_path / "preguntas.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                    encoding="utf-8")
    return path


def test_valid_file_is_normalized(tmp_path):
    path = write(tmp_path, [
        {"pregunta": "  ¿Qué es la fotosíntesis?  ", "palabras_clave": [" luz ", "clorofila"],
         "referencia": "Proceso que convierte la energía de la luz en energía química."},
        {"pregunta": "¿Qué es una enzima?"},
    ])
    questions = load_questions(path)
    assert questions == [
        {"pregunta": "¿Qué es la fotosíntesis?", "palabras_clave": ["luz", "clorofila"],
         "referencia": "Proceso que convierte la energía de la luz en energía química.", "hecho": None},
        {"pregunta": "¿Qué es una enzima?", "palabras_clave": [], "referencia": None, "hecho": None},
    ]


@pytest.mark.parametrize("content, expected", [
    ('[{"pregunta": "¿Qué es el ADN?"},]', ["no es un JSON válido", "línea 1"]),
    ({"pregunta": "¿Qué es el ADN?"}, ["debe ser una lista JSON", "un objeto"]),
    ([], ["vacía"]),
    ([{"pregunta": "¿Qué es el ADN?"}, "¿Y el ARN?"], ["entrada 2", "objeto JSON", "un texto"]),
    ([{"pregunta": "¿Qué es el ADN?"}, {"palabras_clave": ["ARN"]}], ["entrada 2", "falta", "'pregunta'"]),
    ([{"pregunta": 42}], ["entrada 1", "'pregunta'", "un número"]),
    ([{"pregunta": "¿A?"}, {"pregunta": "   "}], ["entrada 2", "'pregunta'", "vacío"]),
    ([{"pregunta": "¿A?", "palabras_clave": "luz"}], ["entrada 1", "'palabras_clave'", "lista"]),
    ([{"pregunta": "¿A?", "palabras_clave": ["luz", 3]}], ["entrada 1", "'palabras_clave'", "elemento 2"]),
    ([{"pregunta": "¿A?", "palabras_clave": ["luz", " "]}], ["elemento 2", "vacío"]),
    ([{"pregunta": "¿A?", "referencia": ["x"]}], ["entrada 1", "'referencia'", "una lista"]),
    ([{"pregunta": "¿A?", "palabras clave": ["luz"]}], ["entrada 1", "campo desconocido 'palabras clave'"]),
    ([{"pregunta": "¿Qué es el ADN?"}, {"pregunta": "¿qué es  el ADN?"}], ["entrada 2", "repite", "entrada 1"]),
])
def test_mistakes_name_file_entry_and_field(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(UserError) as info:
        load_questions(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UserError, match="No existe el fichero de preguntas"):
        load_questions(tmp_path / "no_existe.json")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"pregunta": "¿Qué es la célula?"}]'.encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_questions(latin1)


def test_repository_questions_file_is_valid():
    assert REPO_QUESTIONS.exists(), f"falta {REPO_QUESTIONS}, el fichero de preguntas de contraste del proyecto"
    questions = load_questions(REPO_QUESTIONS)
    assert len(questions) >= 5
