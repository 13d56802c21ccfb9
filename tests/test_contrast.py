"""Contrast metrics, the verdict, and held-out perplexity on the real embedded model."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afinar.evaluate.contrast import build_contrast, load_answers, repeated_3gram_ratio
from afinar.evaluate.keywords import keyword_coverage
from afinar.evaluate.language import spanish_ratio, words
from afinar.core.embedded import ensure_checkpoint
from afinar.core.errors import UserError
from afinar.evaluate.perplexity import perplexity, response_nll

SPANISH = ("La fotosíntesis es el proceso por el que las plantas transforman la energía de la luz en energía "
           "química. El oxígeno que liberan procede de la ruptura del agua en el fotosistema II. No. ATP.")
ENGLISH = ("Photosynthesis is the process by which green plants use sunlight to make food. The oxygen they "
           "release comes from splitting water in photosystem II. Yes.")


# ------------------------------------------------------------------------------------------- spanish_ratio


PORTUGUESE = ("A fotossíntese é o processo pelo qual as plantas verdes usam a luz do sol para produzir alimento. "
              "As mitocôndrias produzem a maior parte do ATP da célula por meio da respiração aeróbica.")
ITALIAN = ("La fotosintesi è il processo con cui le piante verdi usano la luce del sole per produrre cibo. "
           "I mitocondri producono la maggior parte dell'ATP della cellula attraverso la respirazione aerobica.")
# Spanish sentences that py3langid alone puts in Portuguese or Italian: the margin keeps them Spanish.
SPANISH_LOOKALIKES = "La pared celular formada principalmente por celulosa da forma. El glicolato sale del cloroplasto."


def test_spanish_ratio_on_spanish_english_and_mixed_text():
    assert spanish_ratio(SPANISH) == 1.0
    assert spanish_ratio(SPANISH_LOOKALIKES) == 1.0
    assert spanish_ratio(ENGLISH) == 0.0
    assert spanish_ratio(PORTUGUESE) == 0.0
    assert spanish_ratio(ITALIAN) == 0.0
    mixed = SPANISH + "\n" + ENGLISH
    expected = len(words(SPANISH)) / (len(words(SPANISH)) + len(words(ENGLISH)))
    assert spanish_ratio(mixed) == pytest.approx(expected, abs=0.05)
    # A switch of language inside one long sentence is caught too (segments of at most 12 words).
    one_sentence = ("Las mitocondrias producen la mayor parte del ATP de la célula mediante la respiración "
                    "aeróbica, while the chloroplasts of green plants capture light energy and store it as sugar")
    assert 0.35 < spanish_ratio(one_sentence) < 0.75


def test_spanish_ratio_on_short_texts():
    assert spanish_ratio("Sí, claro.") == 1.0
    assert spanish_ratio("Yes, of course.") == 0.0
    assert spanish_ratio("La célula.") == 1.0
    assert spanish_ratio("ATP") == 1.0, "a lone neutral term is no evidence of another language"
    assert spanish_ratio("") == 0.0
    # A loop is still Spanish: repetition is a separate metric.
    assert spanish_ratio("una fotía de la fotosíntesis, que es una fotía de la fotosíntesis, que es") == 1.0


# ------------------------------------------------------------------------------------ repetition, keywords


def test_repeated_3gram_ratio_catches_loops():
    loop = "una fotía de la fotosíntesis, que es una fotía de la fotosíntesis, que es una fotía"
    # 14 words, 12 trigrams; from the second "una fotía de" on, 6 of them repeat an earlier one.
    assert repeated_3gram_ratio(loop) == pytest.approx(6 / 12)
    assert repeated_3gram_ratio(SPANISH) == 0.0
    assert repeated_3gram_ratio("Dos palabras") == 0.0
    assert repeated_3gram_ratio("El ciclo el Ciclo EL CICLO") == pytest.approx(2 / 4), "case does not hide a loop"


def test_keyword_coverage_ignores_case_and_accents_and_matches_stems():
    text = "Las MITOCONDRIAS producen ATP; la fotolisis del agua libera oxigeno en el ciclo de Calvin."
    assert keyword_coverage(text, ["mitocondria", "atp", "fotólisis", "oxígeno"]) == 1.0
    assert keyword_coverage(text, ["ciclo de Calvin", "ciclo de Krebs"]) == 0.5
    assert keyword_coverage(text, ["ADN", "respir", "luz", "agua"]) == 0.25
    assert keyword_coverage(text, ["AT"]) == 0.0, "short keywords match whole words only"
    assert keyword_coverage(text, []) is None
    assert keyword_coverage("El año de la célula", ["ano"]) == 0.0, "ñ is not n"


# ------------------------------------------------------------------------------------------------ verdict

QUESTIONS = [
    {"pregunta": "¿De dónde procede el oxígeno de la fotosíntesis?", "palabras_clave": ["agua", "fotólisis"],
     "referencia": None},
    {"pregunta": "¿Qué hace la mitocondria?", "palabras_clave": ["ATP", "respiración"], "referencia": None},
]
LOOPING = "El oxígeno es el código de la fotosíntesis, que es el código de la fotosíntesis, que es el código"
GOOD = [
    "El oxígeno procede del agua: la fotólisis en el fotosistema II la rompe y libera O2.",
    "La mitocondria obtiene ATP mediante la respiración celular, oxidando azúcares y grasas.",
]


def rows(texts, ended):
    return [{"question": q["pregunta"], "text": t, "ended_with_eos": e, "new_tokens": 30, "seconds": 0.5}
            for q, t, e in zip(QUESTIONS, texts, ended)]


def test_good_after_answers_make_the_model_ready():
    before = rows([LOOPING, "The mitochondria is the powerhouse of the cell."], [False, True])
    contrast = build_contrast(QUESTIONS, before, rows(GOOD, [True, True]), 18.5, 11.2)

    assert set(contrast) == {"perplexity", "questions", "aggregate", "verdict", "probe"}
    assert contrast["perplexity"] == {"before": 18.5, "after": 11.2}
    first = contrast["questions"][0]
    assert set(first) == {"question", "fact", "before", "after"}
    assert set(first["after"]) == {"text", "ended_with_eos", "spanish_ratio", "repeated_3gram_ratio",
                                   "keyword_coverage", "fact"}
    assert first["before"]["repeated_3gram_ratio"] > 0.3 and first["after"]["repeated_3gram_ratio"] == 0.0
    assert contrast["aggregate"]["before"]["spanish_ratio"] < 0.8
    assert contrast["aggregate"]["after"]["spanish_ratio"] == 1.0
    assert contrast["aggregate"]["after"]["keyword_coverage_mean"] == 1.0
    assert contrast["verdict"]["ready"] is True
    reasons = contrast["verdict"]["reasons"]
    # Seven criteria; without facts in the questions or a probe, those two do not apply.
    assert len(reasons) == 7 and sum(r.startswith("Cumple") for r in reasons) == 5
    assert all(r.startswith(("Cumple", "No aplica")) for r in reasons)
    assert any("18,50" in r and "11,20" in r for r in reasons)
    json.dumps(contrast)  # the report is written as JSON


@pytest.mark.parametrize("after_texts, ended, ppl_after, failing", [
    (GOOD, [True, False], 11.2, "EOS"),
    ([GOOD[0], "The mitochondria makes ATP through cellular respiration in the cell."], [True, True], 11.2,
     "español"),
    ([LOOPING, GOOD[1]], [True, True], 11.2, "3-gramas"),
    (["El oxígeno sale de la hoja.", "La mitocondria es un orgánulo."], [True, True], 11.2, "palabras clave"),
    (GOOD, [True, True], 18.5, "perplejidad"),
])
def test_each_failed_criterion_blocks_the_verdict(after_texts, ended, ppl_after, failing):
    before = rows(GOOD, [True, True]) if failing == "palabras clave" else rows([LOOPING, LOOPING], [False, False])
    contrast = build_contrast(QUESTIONS, before, rows(after_texts, ended), 18.5, ppl_after)
    assert contrast["verdict"]["ready"] is False
    failed = [r for r in contrast["verdict"]["reasons"] if r.startswith("No cumple")]
    assert len(failed) == 1 and failing in failed[0]


def test_questions_without_keywords_skip_that_criterion():
    plain = [{"pregunta": q["pregunta"], "palabras_clave": [], "referencia": None} for q in QUESTIONS]
    contrast = build_contrast(plain, rows([LOOPING, LOOPING], [False, False]), rows(GOOD, [True, True]), 18.5, 11.2)
    assert contrast["questions"][0]["after"]["keyword_coverage"] is None
    assert contrast["verdict"]["ready"] is True
    assert any(r.startswith("No aplica") for r in contrast["verdict"]["reasons"])


def test_answers_of_other_questions_are_rejected(tmp_path):
    after = rows(GOOD, [True, True])
    after[1]["question"] = "¿Qué es el ARN?"
    with pytest.raises(UserError, match="respuesta 2 de después"):
        build_contrast(QUESTIONS, rows(GOOD, [True, True]), after, 18.5, 11.2)
    with pytest.raises(UserError, match="1 y las preguntas de contraste 2"):
        build_contrast(QUESTIONS, rows(GOOD, [True, True])[:1], after, 18.5, 11.2)
    damaged = tmp_path / "antes.jsonl"
    damaged.write_text(json.dumps(after[0], ensure_ascii=False) + "\n{\"question\": 1}\n", encoding="utf-8")
    with pytest.raises(UserError, match="línea 2, campo 'question'"):
        load_answers(damaged)


# --------------------------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = ensure_checkpoint(verbose=False)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_perplexity_is_lower_on_repeated_text_than_on_random_words(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sentence = "La célula es la unidad básica de la vida y todas proceden de otra célula."
    vocabulary = words(sentence + " " + SPANISH)
    scramble = random.Random(0)
    random_text = " ".join(scramble.choice(vocabulary) for _ in range(8 * len(words(sentence))))
    repeated = [{"instruction": "Repite la idea.", "output": " ".join([sentence] * 8)}]
    scrambled = [{"instruction": "Repite la idea.", "output": random_text}]

    low = perplexity(model, tokenizer, repeated, max_seq_length=512, batch_size=1)
    high = perplexity(model, tokenizer, scrambled, max_seq_length=512, batch_size=1)
    assert math.isfinite(low) and math.isfinite(high)
    assert 1.0 < low < high / 4


def test_perplexity_is_token_weighted_and_independent_of_batching(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    entries = [
        {"instruction": "¿Qué es una enzima?", "output": "Una proteína que acelera una reacción química."},
        {"instruction": "Resume el texto.", "input": "Las mitocondrias producen ATP.",
         "output": "Las mitocondrias son la central energética de la célula: producen ATP por respiración."},
        {"instruction": "¿Qué es el ADN?", "output": "El ácido desoxirribonucleico, que guarda la información "
                                                      "genética de casi todos los seres vivos."},
    ]
    one_by_one = [response_nll(model, tokenizer, [e], max_seq_length=256, batch_size=1) for e in entries]
    together = perplexity(model, tokenizer, entries, max_seq_length=256, batch_size=3)
    expected = math.exp(sum(n for n, _ in one_by_one) / sum(t for _, t in one_by_one))
    # Right padding in a batch of three must not change any token's loss.
    assert together == pytest.approx(expected, rel=1e-4)
    # Only response tokens count: each entry scores its response plus the closing EOS.
    for entry, (_, tokens) in zip(entries, one_by_one):
        assert tokens == len(tokenizer(entry["output"], add_special_tokens=False)["input_ids"]) + 1


def test_perplexity_batches_rows_of_similar_length(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long_answer = "La fotosíntesis transforma la energía de la luz en energía química. " * 6
    entries = [{"instruction": "Explica la fotosíntesis.", "output": long_answer},
               {"instruction": "¿Qué es el ATP?", "output": "Una molécula que almacena energía."},
               {"instruction": "Explica la fotosíntesis otra vez.", "output": long_answer},
               {"instruction": "¿Qué es el ADN?", "output": "El portador de la información genética."}]
    widths = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        padded = response_nll(model, tokenizer, entries, max_seq_length=256, batch_size=2, packed=False)
        padded_widths, widths[:] = list(widths), []
        packed = response_nll(model, tokenizer, entries, max_seq_length=256)  # on the CPU: packed rows
    finally:
        hook.remove()
    # Padded batches (the GPU's way): in the given order each batch would pair a long row with a short one and pad
    # the short one to the long length; sorted by length, the two short rows share one batch, the long ones the other.
    assert len(padded_widths) == 2 and padded_widths[0][1] < padded_widths[1][1] / 2
    # Packed rows (the CPU's): no padding and the system prompt once per row, so fewer positions, the same sum.
    assert sum(w[0] * w[1] for w in widths) < 0.9 * sum(w[0] * w[1] for w in padded_widths)
    assert packed[1] == padded[1] and packed[0] == pytest.approx(padded[0], rel=1e-5)


def test_perplexity_rejects_malformed_entries(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    entries = [{"instruction": "¿Qué es una enzima?", "output": "Una proteína."}, {"instruction": "¿Y el ADN?"}]
    with pytest.raises(UserError, match="evaluacion.jsonl, entrada 2, campo 'output'"):
        perplexity(model, tokenizer, entries, max_seq_length=128, source="evaluacion.jsonl")
    with pytest.raises(UserError, match="No hay entradas"):
        perplexity(model, tokenizer, [], max_seq_length=128)
