"""Issue 24: the corrected fact must win over the old error — the fact check of the answers, the likelihood
probe (sondas_errores.json), preference training on `rejected`, and the verdict that uses them."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, run_script

from afinar.evaluate import facts, probe
from afinar.evaluate.contrast import build_contrast, criteria
from afinar.evaluate.questions import load_questions
from afinar.evaluate.report import markdown_report

OXYGEN_ERROR = "El oxígeno liberado se libera por los estomas del CO2 y del agua de la hoja."


# ------------------------------------------------------------------------------------------ fact check


@pytest.fixture(scope="module")
def questions():
    return load_questions(ROOT / "preguntas_contraste.json")


def test_a_keyword_inside_a_wrong_sentence_does_not_pass(questions):
    oxygen = questions[0]["hecho"]
    # The answer the default demo gave (issue 24): it names water, but says the oxygen comes from CO2.
    result = facts.check(OXYGEN_ERROR, oxygen)
    assert result["states_error"] and not result["passed"]
    assert not facts.check("El oxígeno no procede del agua.", oxygen)["passed"]
    assert facts.check("El oxígeno no viene del CO2, sino del agua.", oxygen)["passed"]
    assert facts.check("Es un error pensar que el oxígeno sale del CO₂: sale del agua.", oxygen)["passed"]


def test_every_reference_answer_states_its_own_fact(questions):
    with_facts = [q for q in questions if q["hecho"]]
    assert len(with_facts) >= 5
    for question in with_facts:
        result = facts.check(question["referencia"], question["hecho"])
        assert result["passed"], (question["pregunta"], result)


def test_typical_errors_fail_their_fact(questions):
    errors = {
        0: "El oxígeno que liberan las plantas procede del dióxido de carbono que absorben.",
        1: "Las plantas solo respiran por la noche, cuando no hay luz.",
        2: "Sí, el ciclo de Calvin necesita oscuridad y ocurre por la noche.",
        3: "Las hojas son verdes porque la clorofila absorbe la luz verde.",
        4: "La masa de un árbol procede del suelo, de los minerales que absorben las raíces.",
    }
    for index, text in errors.items():
        assert not facts.check(text, questions[index]["hecho"])["passed"], text


def test_a_bad_fact_pattern_is_a_spanish_error_with_the_field(tmp_path):
    bad = tmp_path / "preguntas.json"
    bad.write_text(json.dumps([{"pregunta": "¿Qué?", "hecho": {"afirma": ["(agua"]}}]), encoding="utf-8")
    proc = run_script("02_load_model.py", "--output-dir", str(tmp_path / "s"), "--questions", str(bad), check=False)
    assert proc.returncode == 2
    assert "hecho.afirma" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ probe file


def _word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_probe_pairs_were_never_trained_on():
    pairs = probe.load_pairs(ROOT / "sondas_errores.json")
    assert len(pairs) >= 30
    training = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    seen = set()
    for entry in training:
        for field in ("instruction", "input", "output", "rejected"):
            seen |= _word_runs(entry.get(field) or "", 6)
    for pair in pairs:
        for key in ("verdadera", "falsa"):
            shared = _word_runs(pair[key], 6) & seen
            assert not shared, (pair[key], shared)


def test_probe_file_errors_name_the_pair_and_field(tmp_path):
    bad = tmp_path / "sondas.json"
    bad.write_text(json.dumps([{"pregunta": "¿Qué?", "verdadera": "Sí.", "falsa": 3}]), encoding="utf-8")
    proc = run_script("02_load_model.py", "--output-dir", str(tmp_path / "s"), "--probe-file", str(bad),
                      check=False)
    assert proc.returncode == 2
    assert "par 1" in proc.stderr and "falsa" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()  # checked before the output folder is created


# ------------------------------------------------------------------------------- scoring with the model


@pytest.fixture(scope="module")
def small_model(embedded_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.prompts import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    return model, tokenizer


def test_sequence_logps_equal_the_full_logits_computation(small_model):
    import torch

    from afinar.evaluate.logprobs import right_padded, sequence_logps
    from afinar.core.prompts import IGNORE_INDEX, tokenize_example

    model, tokenizer = small_model
    rows = [tokenize_example(tokenizer, {"instruction": "¿Qué es el ATP?", "output": text}, 256)
            for text in ("Es la molécula que almacena energía.", "Una molécula.")]
    batch = right_padded(rows, tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        fast, counts = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, row in enumerate(rows):
        expected = 0.0
        for t in range(1, len(row["input_ids"])):
            if row["labels"][t] != IGNORE_INDEX:
                expected += torch.log_softmax(logits[i, t - 1], -1)[row["labels"][t]].item()
        assert fast[i].item() == pytest.approx(expected, abs=1e-3)
        assert counts[i].item() == sum(1 for label in row["labels"] if label != IGNORE_INDEX)


def test_probe_prefers_the_plainly_true_statement(small_model):
    model, tokenizer = small_model
    pairs = [{"tema": "agua", "pregunta": "¿De qué está formada el agua?",
              "verdadera": "El agua está formada por hidrógeno y oxígeno.",
              "falsa": "El agua está formada por hidrógeno y hierro oxidado de tostadora."}]
    result = probe.score_pairs(model, tokenizer, pairs)
    assert result[0]["true_wins"] and result[0]["logp_true"] > result[0]["logp_false"]
    flipped = [{**pairs[0], "verdadera": pairs[0]["falsa"], "falsa": pairs[0]["verdadera"]}]
    assert not probe.score_pairs(model, tokenizer, flipped)[0]["true_wins"]


@pytest.mark.slow
def test_preference_training_makes_the_correct_answer_win(small_model):
    import torch

    from afinar.train.preference import train_preference

    model, tokenizer = small_model
    entries = [
        {"instruction": "¿De dónde sale el oxígeno de la fotosíntesis?", "input": "",
         "output": "Sale del agua, que se rompe en la fase luminosa.",
         "rejected": "Sale del dióxido de carbono, que se rompe en la fase luminosa."},
        {"instruction": "¿Cuándo respiran las plantas?", "input": "",
         "output": "Respiran de día y de noche, sin parar.",
         "rejected": "Respiran solo de noche, cuando no hay luz."},
        {"instruction": "¿Tienen mitocondrias las células vegetales?", "input": "", "output": "Sí, las tienen.",
         "rejected": "No, solo tienen cloroplastos."},
        {"instruction": "Una entrada sin error que entrenar", "input": "", "output": "Se ignora en esta fase."},
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = train_preference(model, tokenizer, entries, max_seq_length=256, beta=0.1, epochs=6,
                               learning_rate=5e-3, batch_size=3, sft_weight=1.0, seed=0, log=lambda _: None)
    assert metrics["pairs"] == 3 and metrics["steps"] == 6
    assert metrics["train_pairs_correct_after"] == 1.0
    assert metrics["train_pairs_correct_after"] >= metrics["train_pairs_correct_before"]
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)


@pytest.mark.slow
def test_orpo_option_trains_the_preference_inside_the_sft(tmp_path):
    """03 --preference orpo: the entries' rejected answers ride in the SFT rows (no phase after it); run.json, the
    log and the contrast report's note say so."""
    from afinar.evaluate.report import method_note

    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    pairs = sorted((e for e in entries if "rejected" in e), key=lambda e: len(e["output"] + e["rejected"]))[:8]
    dataset = tmp_path / "datos.json"
    dataset.write_text(json.dumps([e for e in entries if "rejected" not in e][:8] + pairs, ensure_ascii=False),
                       encoding="utf-8")
    questions = tmp_path / "preguntas.json"
    questions.write_text(json.dumps([{"pregunta": "¿Respiran las plantas?"}], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "salida"
    run_script("02_load_model.py", "--output-dir", str(out), "--questions", str(questions), "--max-new-tokens", "4",
               "--max-seq-length", "160")
    trained = run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(dataset), "--max-steps", "2",
                         "--preference", "orpo", "--orpo-beta", "2", "--eval-fraction", "0.1")
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["preference"] == "orpo" and manifest["settings"]["orpo_beta"] == 2.0
    preference = manifest["stages"]["train"]["metrics"]["preference"]
    assert preference["mode"] == "orpo" and preference["beta"] == 2.0 and preference["pairs"] >= 6
    assert "ORPO dentro del SFT, beta 2.0" in trained.stdout
    assert "preference_step=" not in trained.stdout  # no DPO phase after the SFT
    assert "SFT con ORPO dentro de él (beta 2.0)" in method_note({"preference": preference})


# ------------------------------------------------------------------------------------------ data field


def test_rejected_reaches_training_and_must_differ_from_output(tmp_path):
    from afinar.data.pipeline import prepare
    from afinar.train.preference import triples

    data = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    with_rejected = [e for e in data if e.get("rejected")]
    assert len(with_rejected) >= 60
    prepared = prepare(ROOT / "tu_dataset.json", eval_fraction=0.1, seed=42)
    assert len(triples(prepared.train)) + sum(1 for e in prepared.eval if e.get("rejected")) == len(with_rejected)

    bad = tmp_path / "datos.json"
    bad.write_text(json.dumps([{"instruction": "¿Qué?", "output": "Esto.", "rejected": "Esto."}]), encoding="utf-8")
    proc = run_script("03_train_model.py", "--check-data", "--dataset", str(bad), check=False)
    assert proc.returncode == 2
    assert "entrada 1" in proc.stderr and "rejected" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------- verdict


def _contrast(share_after: float):
    questions = [{"pregunta": "¿De dónde proviene el oxígeno?", "palabras_clave": ["agua"],
                  "hecho": load_questions(ROOT / "preguntas_contraste.json")[0]["hecho"]}]
    before = [{"question": "¿De dónde proviene el oxígeno?", "text": OXYGEN_ERROR, "ended_with_eos": True}]
    after = [{"question": "¿De dónde proviene el oxígeno?", "text": "Proviene del agua, no del CO2.",
              "ended_with_eos": True}]
    n = 10
    won = round(share_after * n)
    items = [{"tema": "t", "pregunta": "p", "true_wins": i < won, "logp_true": -1.0, "logp_false": -2.0}
             for i in range(n)]
    probe_summary = probe.summary([{**i, "true_wins": False} for i in items], items, "sondas_errores.json")
    return build_contrast(questions, before, after, 30.0, 10.0, probe=probe_summary)


def test_verdict_needs_the_probe_and_the_fact():
    passing = _contrast(0.9)
    assert criteria(passing)["facts"][0] is True and criteria(passing)["probe"][0] is True
    # Keyword coverage is shown but no longer decides where the questions carry facts.
    assert criteria(passing)["keywords"][0] is None
    assert passing["verdict"]["ready"]
    failing = _contrast(0.8)
    assert criteria(failing)["probe"][0] is False and not failing["verdict"]["ready"]
    report = markdown_report(failing)
    assert "Sonda de errores" in report and "8 de 10" in report
    assert "afirma el hecho corregido" in report and "repite el error" in report
