"""Alpaca, ShareGPT (`conversations`) and chat (`messages`) data, single and multi-turn, detected per entry."""

from __future__ import annotations

import json

import pytest

from afinar.data import data_clean
from afinar.core import prompts
from afinar.data.data_check import read_dataset
from afinar.core.errors import UserError
from conftest import ROOT, run_script

SHAREGPT_MULTI = {"conversations": [
    {"from": "human", "value": "¿Qué es una célula eucariota?"},
    {"from": "gpt", "value": "Es una célula con núcleo delimitado por una membrana."},
    {"from": "human", "value": "¿Y una procariota?"},
    {"from": "gpt", "value": "Una célula sin núcleo: su ADN está libre en el citoplasma."},
]}
MESSAGES_SINGLE = {"messages": [
    {"role": "user", "content": "¿Dónde ocurre la fotosíntesis?"},
    {"role": "assistant", "content": "En los cloroplastos de las células vegetales."},
]}
MESSAGES_SYSTEM = {"messages": [
    {"role": "system", "content": "Eres un profesor de genética muy paciente."},
    {"role": "user", "content": "¿Qué es un alelo?"},
    {"role": "assistant", "content": "Cada una de las variantes de un mismo gen."},
]}
ALPACA = {"instruction": "¿Qué es la mitosis?", "input": "", "output": "La división del núcleo en dos idénticos."}


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_every_format_is_detected_and_normalised(tmp_path):
    data = read_dataset(_write_jsonl(tmp_path / "mezcla.jsonl", [ALPACA, SHAREGPT_MULTI, MESSAGES_SINGLE,
                                                                  MESSAGES_SYSTEM]))
    alpaca, multi, single, system = data.entries
    assert alpaca == ALPACA
    assert multi["instruction"] == "¿Qué es una célula eucariota?" and multi["output"].startswith("Una célula sin")
    assert [t["role"] for t in multi["turns"]] == ["user", "assistant", "user", "assistant"]
    # A single exchange is an Alpaca entry: trained, deduplicated and measured exactly like one.
    assert single == {"instruction": "¿Dónde ocurre la fotosíntesis?", "input": "",
                      "output": "En los cloroplastos de las células vegetales."}
    assert system["turns"][0] == {"role": "system", "content": "Eres un profesor de genética muy paciente."}


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "human", "value": "Hola"}, {"from": "robot", "value": "x"}]},
     "entrada 1 (línea 1), campo «conversations[1].from»: el papel «robot» no se reconoce"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "entrada 1 (línea 1), campo «messages[1]»: se esperaba un turno de asistente"),
    ({"messages": [{"role": "user", "content": "¿Y?"}]},
     "entrada 1 (línea 1), campo «messages»: la conversación debe terminar con una respuesta del asistente"),
    ({"messages": [{"role": "user", "content": "¿Y?"}, {"role": "assistant"}]},
     "entrada 1 (línea 1), campo «messages[1].content»: falta el campo"),
    ({"conversations": [{"from": "human", "value": "¿Y?"}, {"from": "gpt", "value": 3}]},
     "entrada 1 (línea 1), campo «conversations[1].value»: debe ser un texto y es un número"),
    ({"messages": "hola"}, "entrada 1 (línea 1), campo «messages»: debe ser una lista de turnos"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "c"}]},
     "entrada 1 (línea 1), campo «messages[2]»: el sistema solo puede ir en el primer turno"),
])
def test_bad_conversations_name_file_entry_and_field(tmp_path, record, expected):
    path = tmp_path / "malos.json"
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_dataset(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_check_data_refuses_a_bad_conversation_with_exit_code_2(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [MESSAGES_SINGLE, {"messages": [{"role": "user", "content": "x"}]}])
    result = run_script(str(ROOT / "03_train_model.py"), "--check-data", "--dataset", str(path), check=False, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "línea 2, campo «messages»: la conversación debe terminar" in result.stderr


def test_conversations_are_deduplicated_and_language_checked():
    english = {"instruction": "What is a cell?", "input": "", "output": "x", "turns": [
        {"role": "user", "content": "What is a cell? Please explain in some detail for my biology class."},
        {"role": "assistant", "content": "A cell is the basic structural and functional unit of all living "
                                         "organisms, surrounded by a membrane."},
        {"role": "user", "content": "And what does the nucleus do inside the cell?"},
        {"role": "assistant", "content": "The nucleus stores the genetic material and controls gene expression."},
    ]}
    multi = {"instruction": "a", "input": "", "output": "b",
             "turns": [{"role": t["from"] == "human" and "user" or "assistant", "content": t["value"]}
                       for t in SHAREGPT_MULTI["conversations"]]}
    # Same first question and last answer, a different middle: not a duplicate.
    other_middle = {**multi, "turns": [*multi["turns"][:2], {"role": "user", "content": "¿Y las arqueas?"},
                                       multi["turns"][3]]}
    result = data_clean.clean([multi, dict(multi), other_middle, english])
    assert [d.index for d in result.exact] == [1]
    assert [flag.index for flag in result.non_spanish] == [3]


def test_loss_falls_on_every_assistant_turn_and_only_there(embedded_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    prompts.ensure_pad_token(tokenizer)
    entry = read_dataset_entry(SHAREGPT_MULTI)
    row = prompts.tokenize_example(tokenizer, entry, max_seq_length=1024)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)

    # The labelled tokens form one span per assistant turn, each closed by EOS.
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != prompts.IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    answers = [t["value"] for t in SHAREGPT_MULTI["conversations"] if t["from"] == "gpt"]
    assert len(spans) == 2
    for span, answer in zip(spans, answers):
        assert span[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(span[:-1]).strip() == answer
    labelled = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != prompts.IGNORE_INDEX])
    for question in ("célula eucariota", "procariota", prompts.DEFAULT_SYSTEM_PROMPT[:20]):
        assert question not in labelled
    # The whole conversation is the chat template's rendering: what the chat sees at inference.
    assert ids == prompts._template_ids(tokenizer, prompts.conversation_messages(entry), False)

    # Too long for both answers: the second turn goes whole, the first is kept with its EOS.
    first_end = ids.index(tokenizer.eos_token_id, labels.index(spans[0][0]))
    short = prompts.tokenize_example(tokenizer, entry, max_seq_length=first_end + 3)
    assert short["input_ids"] == ids[: first_end + 1]
    assert [t for t in short["labels"] if t != prompts.IGNORE_INDEX] == spans[0]


def read_dataset_entry(record):
    from afinar.data.data_check import CheckStats, Problems, validate_record

    problems = Problems("prueba")
    entry = validate_record(record, "entrada 1", problems, CheckStats())
    assert not problems, problems.message()
    return entry


@pytest.mark.slow
def test_mixed_formats_train_with_eval_loss_every_n_steps(stage02_dir, tmp_path):
    """03 on Alpaca + ShareGPT + messages data: it trains, and the held-out loss lands in metrics.jsonl
    and loss.png every --eval-steps."""
    from conftest import copy_output

    out = copy_output(stage02_dir, tmp_path / "salida")
    alpaca = [e for e in json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
              if "rejected" not in e][:12]
    topics = [("la mitocondria", "produce ATP mediante la respiración celular"),
              ("el cloroplasto", "hace la fotosíntesis captando luz con la clorofila"),
              ("el ribosoma", "traduce el ARN mensajero y sintetiza proteínas"),
              ("el aparato de Golgi", "modifica, empaqueta y distribuye proteínas y lípidos"),
              ("el lisosoma", "digiere moléculas y orgánulos gastados con sus enzimas"),
              ("el núcleo", "guarda el ADN y controla la expresión de los genes"),
              ("la vacuola", "almacena agua y sustancias y mantiene la turgencia de la célula vegetal"),
              ("la membrana plasmática", "separa la célula del medio y regula qué entra y qué sale")]
    conversations = []
    for number, (organelle, role) in enumerate(topics):
        first, second = role.split(" y ", 1) if " y " in role else (role, role)
        if number % 2:
            conversations.append({"conversations": [
                {"from": "human", "value": f"¿Qué hace {organelle}?"},
                {"from": "gpt", "value": f"En la célula, {organelle} {first}."},
                {"from": "human", "value": "¿Algo más?"},
                {"from": "gpt", "value": f"Sí: también {second}."},
            ]})
        else:
            conversations.append({"messages": [
                {"role": "user", "content": f"Describe en una frase la función de {organelle}."},
                {"role": "assistant", "content": f"{organelle.capitalize()} {role}."},
            ]})
    dataset = _write_jsonl(tmp_path / "mezcla.jsonl", alpaca + conversations)
    run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(dataset), "--max-steps", "2",
               "--batch-size", "2", "--logging-steps", "1", "--eval-steps", "1", "--eval-fraction", "0.2",
               "--preference", "none", "--max-seq-length", "128")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["eval_loss"] > 0 for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"]["train"]
    assert record["metrics"]["final_eval_loss"] == rows[-1]["eval_loss"]
    assert record["data"]["eval"] > 0
