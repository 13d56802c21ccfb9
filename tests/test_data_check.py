"""Dataset validation: every rejection names file, position and field; all problems are listed."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from afinar.data import pipeline as data
from afinar.data.data_check import MAX_FIELD_CHARS, MAX_LISTED_PROBLEMS, read_dataset
from afinar.data.data_mix import LONG_MIN_WORDS
from afinar.core.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from synthetic_entries import entries as synthetic_entries  # noqa: E402

GOOD = {"instruction": "¿Qué es la mitosis?", "output": "Es la división del núcleo en dos núcleos hijos idénticos."}


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def rejection(path: Path) -> str:
    with pytest.raises(UserError) as info:
        read_dataset(path)
    message = str(info.value)
    assert str(path) in message, "the message must name the file"
    return message


# --------------------------------------------------------------------------------------------------- accepted


def test_json_array_with_bom_and_optional_input(tmp_path):
    rows = [GOOD, dict(GOOD, instruction="Resume el texto.", input="La mitosis tiene cuatro fases.")]
    path = write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    checked = read_dataset(path)
    assert checked.format == "json" and checked.had_bom
    assert [e["input"] for e in checked.entries] == ["", "La mitosis tiene cuatro fases."]
    assert checked.with_input == 1


def test_jsonl_with_bom_blank_lines_and_null_input(tmp_path):
    content = "\ufeff" + jsonl(GOOD) + "\n   \n" + jsonl(dict(GOOD, input=None, output="Otra respuesta."))
    checked = read_dataset(write(tmp_path, "datos.jsonl", content))
    assert checked.format == "jsonl" and checked.had_bom
    assert len(checked.entries) == 2 and checked.entries[1]["input"] == ""


def test_extra_fields_give_one_notice(tmp_path, capsys):
    rows = [dict(GOOD, id=i, text="x", output=f"Respuesta número {i} sobre la mitosis.") for i in range(50)]
    path = write(tmp_path, "extra.json", json.dumps(rows))
    summary = data.check_only(path)
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "campos no reconocidos" in line]
    assert len(notices) == 1
    assert "«id» (50 entradas)" in notices[0] and "«text»" in notices[0]
    assert "50 entradas" in summary


def test_control_characters_removed_and_newlines_normalised(tmp_path):
    row = dict(GOOD, output="Primera línea\r\nsegunda\rtercera\x00\x07 fin\tcon tabulador\x1b.")
    checked = read_dataset(write(tmp_path, "control.jsonl", jsonl(row)))
    assert checked.entries[0]["output"] == "Primera línea\nsegunda\ntercera fin\tcon tabulador."
    assert any("caracteres de control" in n for n in checked.notices)
    assert any("saltos de línea" in n for n in checked.notices)


def test_check_only_summary_paragraph(tmp_path, capsys):
    rows = synthetic_entries(40, long_share=0.25, seed=3)
    rows.append(dict(rows[0]))  # an exact duplicate the summary must count
    path = write(tmp_path, "curso.jsonl", jsonl(*rows))
    summary = data.check_only(path)
    n_long = sum(len(r["output"].split()) >= LONG_MIN_WORDS for r in rows)
    assert "\n" not in summary
    assert f"«{path}» es válido: 41 entradas en formato JSON Lines" in summary
    assert 0 < n_long < 41
    assert f"Respuestas largas (≥ {LONG_MIN_WORDS} palabras): {n_long}; cortas: {41 - n_long}" in summary
    assert "Duplicados exactos: 1;" in summary
    assert "Se puede usar para entrenar." in summary


# --------------------------------------------------------------------------------------------------- rejected


def test_invalid_json_array_gives_line_and_column(tmp_path):
    content = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]'
    message = rejection(write(tmp_path, "roto.json", content))
    assert "línea 3, columna 23" in message and "falta una coma" in message


def test_truncated_jsonl_line(tmp_path):
    content = jsonl(GOOD) + '{"instruction": "¿Qué es un gen?", "outp'
    message = rejection(write(tmp_path, "cortado.jsonl", content))
    assert "línea 2, columna" in message and "truncada" in message


def test_truncated_json_array(tmp_path):
    content = json.dumps([GOOD, GOOD], ensure_ascii=False)[:-30]
    message = rejection(write(tmp_path, "cortado.json", content))
    assert "línea 1, columna" in message and "truncado" in message


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.json"])
def test_non_utf8_bytes_give_byte_offset(tmp_path, name):
    row = json.dumps(dict(GOOD, output="Respuesta con acento: é"), ensure_ascii=False)
    good_line = json.dumps(GOOD)  # \u escapes: line 1 is pure ASCII
    if name.endswith(".jsonl"):
        content = (good_line + "\n" + row + "\n").encode("latin-1")
    else:
        content = ("[" + good_line + ",\n" + row + "]").encode("latin-1")
    offset = next(i for i, byte in enumerate(content) if byte >= 0x80)
    message = rejection(write(tmp_path, name, content))
    assert f"byte {offset}" in message and "línea 2" in message and "UTF-8" in message


def test_utf16_file(tmp_path):
    message = rejection(write(tmp_path, "utf16.json", json.dumps([GOOD]).encode("utf-16")))
    assert "byte 0" in message and "UTF-16" in message


def test_empty_file(tmp_path):
    message = rejection(write(tmp_path, "vacio.jsonl", "\ufeff  \n\n"))
    assert "está vacío" in message


def test_empty_list(tmp_path):
    message = rejection(write(tmp_path, "vacia.json", " [ ] \n"))
    assert "la lista está vacía" in message


def test_single_object_instead_of_list(tmp_path):
    message = rejection(write(tmp_path, "objeto.json", json.dumps(GOOD, indent=2)))
    assert "único objeto JSON" in message


FIELD_CASES = [
    ("not_object", ["una cadena suelta"], "entrada 1 (línea 1): la entrada no es un objeto JSON, es un texto", None),
    ("missing_instruction", [{"output": "b"}], "falta el campo", "instruction"),
    ("null_output", [{"instruction": "a", "output": None}], "es null", "output"),
    ("number_instruction", [{"instruction": 42, "output": "b"}], "debe ser un texto y es un número", "instruction"),
    ("list_output", [{"instruction": "a", "output": ["b"]}], "debe ser un texto y es una lista", "output"),
    ("blank_output", [{"instruction": "a", "output": "  \n\t "}], "está vacío", "output"),
    ("blank_instruction", [{"instruction": "\x00\x01", "output": "b"}], "está vacío", "instruction"),
    ("bad_input", [{"instruction": "a", "input": {"x": 1}, "output": "b"}],
     "debe ser un texto y es un objeto", "input"),
    ("too_long", [{"instruction": "a", "output": "x" * (MAX_FIELD_CHARS + 1)}],
     "tiene 100.001 caracteres; el máximo es 100.000", "output"),
]


@pytest.mark.parametrize("case, rows, expected, field", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_entry_problems_name_position_and_field(tmp_path, case, rows, expected, field):
    rows = [GOOD, GOOD] + rows  # the bad entry is the third one
    array = rejection(write(tmp_path, f"{case}.json", json.dumps(rows, indent=None)))
    lines = rejection(write(tmp_path, f"{case}.jsonl", jsonl(*rows)))
    where_array, where_lines = ("entrada 3 (línea 1)", "línea 3")
    if case == "not_object":
        expected_lines = expected.replace("entrada 1 (línea 1)", "línea 3")
        assert expected.replace("entrada 1", "entrada 3") in array
        assert expected_lines in lines
        return
    for message, where in ((array, where_array), (lines, where_lines)):
        assert f"{where}, campo «{field}»: {expected}" in message


def test_all_problems_reported_with_count_beyond_twenty(tmp_path):
    rows = [GOOD] + [{"instruction": f"pregunta {i}"} for i in range(30)] + [{"instruction": 1, "output": "x"}]
    message = rejection(write(tmp_path, "muchos.jsonl", jsonl(*rows)))
    listed = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(listed) == MAX_LISTED_PROBLEMS
    assert listed[0].startswith("  - línea 2, campo «output»")
    assert "31 problemas" in message.splitlines()[0]
    assert "y 11 problemas más" in message


def test_problems_before_a_syntax_error_are_kept(tmp_path):
    content = '[{"instruction": "a"},\n{"instruction": "b", "output": 3},\n{"instruction": "c", "output": "d"'
    message = rejection(write(tmp_path, "mezcla.json", content))
    assert "entrada 1 (línea 1), campo «output»: falta el campo" in message
    assert "entrada 2 (línea 2), campo «output»: debe ser un texto" in message
    assert "línea 3, columna" in message and "truncado" in message


def test_deep_nesting_is_rejected_without_traceback(tmp_path):
    message = rejection(write(tmp_path, "anidado.json", "[" * 200_000))
    assert "anidamiento" in message


def test_check_only_raises_user_error(tmp_path):
    path = write(tmp_path, "mal.jsonl", jsonl({"instruction": "a"}))
    with pytest.raises(UserError, match="línea 1, campo «output»: falta el campo"):
        data.check_only(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="No existe el archivo de datos"):
        read_dataset(tmp_path / "no_existe.json")


# --------------------------------------------------------------------------------------------------- scale


def _traced_read(path: Path) -> tuple[int, int, int]:
    """(entries read, bytes still held afterwards, peak bytes while reading)."""
    tracemalloc.start()
    checked = read_dataset(path)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return len(checked.entries), kept, peak


def test_large_files_keep_only_the_entries(tmp_path):
    rows = synthetic_entries(20_000, seed=5)
    lines_path = write(tmp_path, "grande.jsonl", jsonl(*rows))
    array_path = write(tmp_path, "grande.json", json.dumps(rows, ensure_ascii=False))
    del rows
    count, kept_lines, peak_lines = _traced_read(lines_path)
    assert count == 20_000
    # JSON Lines is streamed: the peak is the entries plus one line, never the file text on top of them.
    assert peak_lines - kept_lines < 2 * 1024 * 1024
    assert kept_lines < 3 * lines_path.stat().st_size
    # A JSON array is decoded from the file text, but once read nothing but the entries stays behind.
    count, kept_array, _ = _traced_read(array_path)
    assert count == 20_000
    assert kept_array < 1.05 * kept_lines


# --------------------------------------------------------------------------------------------------- script


def test_train_script_check_data_exit_codes(tmp_path):
    """03_train_model.py --check-data: summary and exit 0, or the full listing and exit 2 without traceback."""
    import subprocess

    root = Path(__file__).parents[1]
    good = write(tmp_path, "bien.jsonl", jsonl(*synthetic_entries(10, seed=2)))
    bad = write(tmp_path, "mal.json", json.dumps([GOOD, {"instruction": "x", "output": 5}, "texto"]))
    runs = {}
    for name, path in (("good", good), ("bad", bad)):
        runs[name] = subprocess.run(
            [sys.executable, str(root / "03_train_model.py"), "--check-data", "--dataset", str(path)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
    assert runs["good"].returncode == 0, runs["good"].stderr
    assert "es válido: 10 entradas" in runs["good"].stdout
    assert runs["bad"].returncode == 2
    assert "Traceback" not in runs["bad"].stderr
    assert "entrada 2 (línea 1), campo «output»: debe ser un texto" in runs["bad"].stderr
    assert "entrada 3 (línea 1): la entrada no es un objeto JSON" in runs["bad"].stderr
