"""--system-prompt / --system-prompt-file: chosen in 02, recorded in run.json, inherited by everything after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afinar.core import manifest, prompts
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.export.model_card import render_model_card
from afinar.export.modelfile import modelfile_text
from conftest import ROOT, SMALL_QUESTIONS, run_script

TOPIC = "Eres un tutor de historia de España. Respondes en español, con fechas y fuentes."


@pytest.fixture
def default_prompt():
    yield
    prompts.configure(None)  # the process-wide prompt must not leak into other tests


@pytest.mark.slow
def test_system_prompt_file_reaches_run_json_training_contrast_modelfile_and_card(tmp_path, default_prompt):
    from transformers import AutoTokenizer

    topic_file = tmp_path / "tema.txt"
    topic_file.write_text(f"\n{TOPIC}\n", encoding="utf-8")
    questions = tmp_path / "preguntas.json"
    questions.write_text(json.dumps(SMALL_QUESTIONS[:1], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "salida"
    run_script("02_load_model.py", "--output-dir", str(out), "--questions", str(questions), "--max-new-tokens", "4",
               "--system-prompt-file", str(topic_file), "--precision", "fp32")

    recorded = manifest.read(OutputLayout.at(out))
    assert recorded["system_prompt"] == TOPIC  # stripped, as every conversation will carry it

    # What stages 03 and 04 do right after reading run.json: every conversation now carries the topic.
    prompts.configure_from_manifest(recorded)
    tokenizer = AutoTokenizer.from_pretrained(recorded["settings"]["base_path"])
    prompts.ensure_pad_token(tokenizer)
    example = prompts.tokenize_example(tokenizer, {"instruction": "¿Quién fue Isabel I?", "output": "Una reina."}, 256)
    text = tokenizer.decode(example["input_ids"])
    assert TOPIC in text and prompts.DEFAULT_SYSTEM_PROMPT not in text
    assert prompts.question_messages("¿Y Felipe II?")[0] == {"role": "system", "content": TOPIC}
    assert f'SYSTEM """{TOPIC}"""' in modelfile_text("./m.gguf", "llama3")

    card = render_model_card(tmp_path, kind="merged", manifest=recorded)
    assert TOPIC in card and "biología" not in card and "ciencias de la vida" not in card

    # A hand-edited run.json is refused naming the field, like every other setting.
    damaged = json.loads((out / "run.json").read_text(encoding="utf-8"))
    damaged["system_prompt"] = 7
    (out / "run.json").write_text(json.dumps(damaged), encoding="utf-8")
    with pytest.raises(UserError, match="«system_prompt»: 7 no vale; debe ser un texto no vacío"):
        manifest.read(OutputLayout.at(out))


def test_default_system_prompt_stays_the_biology_one(default_prompt):
    old_run = {"settings": {}}  # a run.json from before the setting existed
    prompts.configure_from_manifest(old_run)
    assert prompts.system_prompt() == prompts.DEFAULT_SYSTEM_PROMPT
    assert "ciencias de la vida" in prompts.DEFAULT_SYSTEM_PROMPT
    card = render_model_card(Path("."), kind="merged", manifest=old_run)
    assert "biología" in card and prompts.DEFAULT_SYSTEM_PROMPT in card


@pytest.mark.parametrize("args, expected", [
    (["--system-prompt", "  "], "--system-prompt"),
    (["--system-prompt", "a", "--system-prompt-file", "x.txt"], "no se puede usar junto con"),
    (["--system-prompt-file", "no_existe.txt"], "no_existe.txt: el archivo no existe"),
    (["--system-prompt", 'Di """hola"""'], "comillas triples"),
    (["--system-prompt", "x" * 2001], "2000 caracteres como mucho"),
])
def test_bad_system_prompt_is_refused_in_spanish_before_anything_is_written(tmp_path, args, expected):
    out = tmp_path / "salida"
    result = run_script(str(ROOT / "02_load_model.py"), "--output-dir", str(out), *args, check=False, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
