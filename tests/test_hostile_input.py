"""Issue 18, fast half: bad flags, damaged run.json and hostile data entries, all refused in Spanish with exit 2
before any model is loaded and before anything on disk changes. Each case runs the real script's main()."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import ROOT, run_script

SCRIPTS = {"02": "02_load_model.py", "03": "03_train_model.py", "04": "04_inference_and_export.py"}


def _script(key: str):
    spec = importlib.util.spec_from_file_location(f"script_{key}", ROOT / SCRIPTS[key])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULES = {key: _script(key) for key in SCRIPTS}


def run_main(key: str, argv: list[str], capsys) -> tuple[int, str]:
    """The script's real main(), in this process: returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        MODULES[key].main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, capsys.readouterr().err


# A valid run.json as stage 02 writes it on CPU (the fields the schema requires, nothing more).
VALID_MANIFEST = {
    "schema": 1,
    "created_at": "2026-01-01T00:00:00+00:00",
    "model": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_path": "/no/existe", "backend": "hf",
              "load_in_4bit": False},
    "settings": {"max_seq_length": 640, "learning_rate": 0.002, "epochs": 3.0, "max_steps": None, "batch_size": 4,
                 "grad_accum": 1, "seed": 42, "warmup_ratio": 0.05, "save_steps": 50, "save_minutes": 10.0,
                 "logging_steps": 5, "packing": True, "engine": "auto", "fp8": False,
                 "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_path": "/no/existe", "backend": "hf",
                 "load_in_4bit": False, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "precision": "fp32"},
    "generation": {"max_new_tokens": 8, "do_sample": False, "batch_size": 8, "repetition_penalty": 1.15},
    "questions_file": "preguntas_contraste.json",
    "stages": {"load": {"status": "done", "finished_at": "2026-01-01T00:00:01+00:00"}},
}


# ------------------------------------------------------------------------------------------ flags (defects 2, 4, 5, 6)

BAD_FLAGS = [
    ("02", ["--lora-r", "0"], "--lora-r"),
    ("02", ["--lora-r", "-4"], "--lora-r"),
    ("02", ["--lora-alpha", "0"], "--lora-alpha"),
    ("02", ["--lora-dropout", "nan"], "--lora-dropout"),
    ("02", ["--lora-dropout", "1"], "--lora-dropout"),
    ("02", ["--max-seq-length", "0"], "--max-seq-length"),  # used to be stored as 640
    ("02", ["--seed", "-1"], "--seed"),
    ("02", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("02", ["--gen-batch-size", "0"], "--gen-batch-size"),
    ("02", ["--repetition-penalty", "inf"], "--repetition-penalty"),
    ("03", ["--learning-rate", "-1"], "--learning-rate"),
    ("03", ["--learning-rate", "nan"], "--learning-rate"),
    ("03", ["--epochs", "0"], "--epochs"),
    ("03", ["--max-seq-length", "1"], "--max-seq-length"),
    ("03", ["--batch-size", "0"], "--batch-size"),  # used to train with 4 while the log said 0
    ("03", ["--max-steps", "0"], "--max-steps"),  # used to mean "no limit"
    ("03", ["--grad-accum", "0"], "--grad-accum"),
    ("03", ["--save-steps", "0"], "--save-steps"),
    ("03", ["--save-minutes", "-1"], "--save-minutes"),
    ("03", ["--logging-steps", "0"], "--logging-steps"),
    ("03", ["--eval-steps", "0"], "--eval-steps"),
    ("03", ["--eval-fraction", "1"], "--eval-fraction"),
    ("03", ["--hub-ratio", "nan"], "--hub-ratio"),
    ("04", ["--gguf", "nonsense"], "--gguf"),  # used to fail after the contrast and the merge
    ("04", ["--gguf", "q8_0,"], "--gguf"),
    ("04", ["--max-new-tokens", "-3"], "--max-new-tokens"),
]


@pytest.mark.parametrize("key, argv, option", BAD_FLAGS, ids=[f"{k}{' '.join(a)}" for k, a, _ in BAD_FLAGS])
def test_bad_flag_is_refused_in_spanish_naming_the_option(key, argv, option, capsys, tmp_path):
    out = tmp_path / "salida"
    code, err = run_main(key, ["--output-dir", str(out), *argv], capsys)
    assert code == 2, err
    assert f"opción {option}:" in err and "Traceback" not in err
    assert not out.exists()  # refused before the output directory was touched


@pytest.mark.parametrize("argv, spanish", [
    (["--no-such-flag"], "opciones no reconocidas: --no-such-flag"),
    (["--backend", "tpu"], "no es un valor válido; elige entre"),
    (["--model"], "opción --model: falta su valor"),
    (["--lora-r", "dieciseis"], "'dieciseis' no es un número entero"),
    (["--lora-dropout", "mucho"], "'mucho' no es un número"),
    (["--overwrite=sí"], "opción --overwrite: no admite valor"),
])
def test_argparse_errors_are_in_spanish(argv, spanish, capsys):
    code, err = run_main("02", argv, capsys)
    assert code == 2 and spanish in err, err
    assert "error:" not in err and "invalid" not in err and "unrecognized" not in err


def test_overwrite_with_a_bad_flag_keeps_the_previous_results(tmp_path):
    """Defect 2, reproduced with the real scripts: the bad flag used to be noticed after the old run was gone."""
    out = tmp_path / "salida"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(VALID_MANIFEST), encoding="utf-8")
    (out / "adapter_inicial").mkdir()
    (out / "adapter_inicial" / "adapter_model.safetensors").write_bytes(b"pesos")
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for script, flag in (("02_load_model.py", ["--lora-r", "0"]), ("03_train_model.py", ["--learning-rate", "-1"])):
        proc = run_script(script, "--output-dir", str(out), "--overwrite", *flag, check=False, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        assert json.loads((out / "run.json").read_text(encoding="utf-8")) == VALID_MANIFEST


# ------------------------------------------------------------------------------------------ run.json (defect 4)


def _write_manifest(out: Path, content) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    (out / "run.json").write_text(text, encoding="utf-8", errors="surrogatepass")


def _without(path: tuple, data=None):
    data = copy.deepcopy(VALID_MANIFEST if data is None else data)
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def _with(path: tuple, value):
    data = copy.deepcopy(VALID_MANIFEST)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


DAMAGED = [
    ("stages-list", {"stages": []}, "«schema»"),
    ("stages-list-with-schema", _with(("stages",), []), "«stages»"),
    ("no-settings", _without(("settings",)), "«settings»"),
    ("no-base-path", _without(("settings", "base_path")), "«settings.base_path»"),
    ("lora-r-text", _with(("settings", "lora_r"), "dieciseis"), "«settings.lora_r»"),
    ("lora-r-bool", _with(("settings", "lora_r"), True), "«settings.lora_r»"),
    ("seed-huge", json.dumps(VALID_MANIFEST).replace('"seed": 42', '"seed": ' + "7" * 5000), "número demasiado largo"),
    ("newer-schema", _with(("schema",), 2), "versión más nueva"),
    ("load-not-object", _with(("stages", "load"), "done"), "«stages.load»"),
    ("not-json", '{"schema": 1,', "JSON no válido"),
    ("array", "[]", "objeto JSON"),
]


@pytest.mark.parametrize("name, content, field", DAMAGED, ids=[d[0] for d in DAMAGED])
@pytest.mark.parametrize("key", ["03", "04"])
def test_damaged_manifest_names_the_field(key, name, content, field, capsys, tmp_path):
    out = tmp_path / "salida"
    _write_manifest(out, content)
    code, err = run_main(key, ["--output-dir", str(out)], capsys)
    assert code == 2, err
    assert field in err and "run.json" in err and "Traceback" not in err
    assert "--overwrite" in err  # what to do


def test_manifest_that_is_a_folder(capsys, tmp_path):
    (tmp_path / "salida" / "run.json").mkdir(parents=True)
    code, err = run_main("03", ["--output-dir", str(tmp_path / "salida")], capsys)
    assert code == 2 and "es una carpeta" in err, err


# Any JSON value may stand where the schema expects another: replace one field of a valid manifest.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
_FIELDS = [("schema",), ("model",), ("settings",), ("stages",), ("generation",)] + \
    [("model", k) for k in VALID_MANIFEST["model"]] + [("settings", k) for k in VALID_MANIFEST["settings"]] + \
    [("stages", "load"), ("stages", "load", "status"), ("generation", "max_new_tokens")]


def _invalid_for(field: tuple, value) -> bool:
    """Whether putting `value` at `field` breaks the schema (the fuzzer keeps only those cases)."""
    from afinar.core import manifest

    return manifest.schema_problem(_with(field, value)) is not None


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_json_values, drop=st.booleans())
def test_fuzzed_manifest_exits_2_without_traceback(field, value, drop, capsys, tmp_path_factory):
    data = _without(field) if drop else _with(field, value)
    from afinar.core import manifest

    if manifest.schema_problem(data) is None:
        return  # still a valid manifest: running 03 would start loading the model
    out = tmp_path_factory.mktemp("fuzz") / "salida"
    _write_manifest(out, data)
    code, err = run_main("03", ["--output-dir", str(out), "--dataset", str(ROOT / "tu_dataset.json")], capsys)
    assert code == 2, err
    assert "run.json" in err and "«" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ data entries (defect 4)


def test_lone_surrogate_and_huge_integer_are_per_entry_problems(tmp_path, capsys):
    data = tmp_path / "datos.json"
    data.write_text('[{"instruction": "hola \\ud800 mundo", "output": "a"},\n'
                    ' {"instruction": "b", "output": ' + "9" * 5000 + '},\n'
                    ' {"instruction": "c", "output": "d"}]', encoding="utf-8")
    code, err = run_main("03", ["--check-data", "--dataset", str(data)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "entrada 1 (línea 1), campo «instruction»: contiene un carácter no válido (U+D800" in err
    assert "entrada 2 (línea 2), campo «output»: debe ser un texto y es un número" in err
    lines = tmp_path / "datos.jsonl"
    lines.write_text('{"instruction": "c", "output": "d"}\n{"instruction": "x", "output": "\\udc00"}\n'
                     '{"instruction": ' + "1" * 5000 + ', "output": "y"}\n', encoding="utf-8")
    code, err = run_main("03", ["--check-data", "--dataset", str(lines)], capsys)
    assert code == 2 and "línea 2, campo «output»: contiene un carácter no válido (U+DC00" in err, err
    assert "línea 3, campo «instruction»: debe ser un texto y es un número" in err


_field_values = st.one_of(
    st.text(), st.integers(min_value=-10**6000, max_value=10**6000), st.floats(allow_nan=True), st.none(),
    st.booleans(), st.lists(st.integers(), max_size=2),
    st.sampled_from(["\ud800", "ok\udfff", "\x00\x1f", "   ", "\r\n"]),
)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "output", "otro\ud800"]),
                                        _field_values, max_size=4), min_size=1, max_size=4),
       as_lines=st.booleans())
def test_fuzzed_data_entries_exit_0_or_2_without_traceback(entries, as_lines, capsys, tmp_path_factory):
    import sys

    sys.set_int_max_str_digits(0)  # so the test itself can write the 6,000-digit numbers
    try:
        if as_lines:
            text = "".join(json.dumps(e, ensure_ascii=True) + "\n" for e in entries)
        else:
            text = json.dumps(entries, ensure_ascii=True, indent=1)
    finally:
        sys.set_int_max_str_digits(4300)
    path = tmp_path_factory.mktemp("datos") / ("d.jsonl" if as_lines else "d.json")
    path.write_text(text, encoding="utf-8")
    code, err = run_main("03", ["--check-data", "--dataset", str(path)], capsys)
    assert code == (0 if all(_entry_ok(e) for e in entries) else 2), err
    assert "Traceback" not in err
    if code == 2:
        assert "«instruction»" in err or "«output»" in err or "«input»" in err, err


def _text_ok(value, required: bool) -> bool:
    """The documented data rules, written independently of afinar.data.data_check."""
    import re

    if value is None:
        return not required
    if not isinstance(value, str) or re.search("[\ud800-\udfff]", value):
        return False
    visible = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", "", value)
    return bool(visible.strip()) or not required


def _entry_ok(entry: dict) -> bool:
    return (_text_ok(entry.get("instruction"), True) and "instruction" in entry
            and _text_ok(entry.get("output"), True) and "output" in entry
            and _text_ok(entry.get("input"), False))


# ------------------------------------------------------------------------------------------ messages (defects 4, 8)


def test_missing_manifest_suggests_a_shell_quoted_command(capsys, tmp_path):
    out = tmp_path / "mi salida (copia)"
    code, err = run_main("03", ["--output-dir", str(out)], capsys)
    assert code == 2 and f"python 02_load_model.py --output-dir '{out}'" in err, err


def test_model_path_that_does_not_exist_says_so(capsys, tmp_path):
    """Defect 8: `--model /nonexistent` blamed the connection."""
    code, err = run_main("02", ["--output-dir", str(tmp_path / "salida"), "--model", str(tmp_path / "no_existe"),
                                "--questions", str(ROOT / "preguntas_contraste.json")], capsys)
    assert code == 2 and "no existe" in err and "conexión" not in err, err
    assert not (tmp_path / "salida").exists()


def test_output_dir_that_is_a_file(capsys, tmp_path):
    """Defect 4: an --output-dir that is a regular file gave a traceback in stage 02."""
    target = tmp_path / "salida"
    target.write_text("no soy una carpeta", encoding="utf-8")
    code, err = run_main("02", ["--output-dir", str(target), "--model", "smollm2-135m",
                                "--questions", str(ROOT / "preguntas_contraste.json")], capsys)
    assert code == 2 and "es un archivo, no una carpeta" in err, err
    assert target.read_text(encoding="utf-8") == "no soy una carpeta"


def test_overwrite_never_empties_the_working_directory(capsys, tmp_path, monkeypatch):
    """`02 --output-dir . --overwrite` from the repository used to delete the repository itself."""
    (tmp_path / "mi_trabajo.txt").write_text("importante", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code, err = run_main("02", ["--output-dir", ".", "--overwrite", "--model", "smollm2-135m",
                                "--questions", str(ROOT / "preguntas_contraste.json")], capsys)
    assert code == 2 and "carpeta de trabajo" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["mi_trabajo.txt"]


def test_lone_surrogate_in_a_question_is_refused_before_loading(capsys, tmp_path):
    questions = tmp_path / "preguntas.json"
    questions.write_text('[{"pregunta": "¿Respiran las plantas?", "palabras_clave": ["resp\\udc80"]}]',
                         encoding="utf-8")
    code, err = run_main("02", ["--output-dir", str(tmp_path / "salida"), "--questions", str(questions)], capsys)
    assert code == 2 and "entrada 1, campo 'palabras_clave': contiene un carácter no válido" in err, err
    assert not (tmp_path / "salida").exists()
