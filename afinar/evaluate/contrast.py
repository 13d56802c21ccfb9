"""The contrast test: per-answer metrics, their aggregates, and the verdict "ready or not".

Metrics of one answer:
- ended_with_eos: the model stopped on its own before the token limit (a model that never stops loops).
- spanish_ratio: share of its words in Spanish (afinar.evaluate.language says how).
- repeated_3gram_ratio: share of its word 3-grams that repeat an earlier one (catches loops).
- keyword_coverage: share of the question's keywords it mentions (None when the question has none;
  afinar.evaluate.keywords).
- fact: for questions with a `hecho`, whether the answer states the corrected fact and not the old error
  (afinar.evaluate.facts); unlike keyword coverage, a right word inside a wrong sentence does not count.
Besides the answers, the misconception probe (afinar.evaluate.probe) and the held-out perplexity enter the verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from afinar.core.errors import UserError
from afinar.data.data_check import spanish_json_error
from afinar.evaluate import facts
from afinar.evaluate.keywords import keyword_coverage
from afinar.evaluate.language import spanish_ratio, spanish_word_count, words
from afinar.evaluate.probe import MIN_PROBE_SHARE
from afinar.evaluate.questions import question_text

# Thresholds of the verdict.
MIN_SPANISH_RATIO = 0.95  # aggregate over all words of the "after" answers
MAX_REPEATED_3GRAM_RATIO = 0.10  # per answer: a tenth of repeated 3-grams is already a visible loop
MIN_KEYWORD_COVERAGE = 0.5  # mean over the questions that have keywords: at least half of the key terms

# ---------------------------------------------------------------------------------------------- word metrics


def repeated_3gram_ratio(text: str) -> float:
    """Share of word 3-grams that repeat an earlier 3-gram of the same text (0.0 below three words)."""
    tokens = [w.casefold() for w in words(text)]
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        if gram in seen:
            repeats += 1
        seen.add(gram)
    return repeats / len(grams)


def answer_metrics(text: str, ended_with_eos: bool, keywords: Sequence[str],
                   fact: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "text": text,
        "ended_with_eos": bool(ended_with_eos),
        "spanish_ratio": round(spanish_ratio(text), 4),
        "repeated_3gram_ratio": round(repeated_3gram_ratio(text), 4),
        "keyword_coverage": _rounded(keyword_coverage(text, keywords)),
        "fact": facts.check(text, fact) if fact else None,
    }


# ---------------------------------------------------------------------------------------- contrast + verdict


def build_contrast(
    questions: Sequence[str | dict[str, Any]],
    before_rows: Sequence[dict[str, Any]],
    after_rows: Sequence[dict[str, Any]],
    perplexity_before: float | None,
    perplexity_after: float | None,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole contrast: perplexity, per-question metrics before/after, aggregates and the verdict.

    `questions` are the entries of `load_questions` (or plain strings); the rows are those of
    `generate_answers`, in the same order. Raises UserError when the rows answer other questions (the
    questions file changed between stages 02 and 04).
    """
    _check_rows_match(questions, before_rows, "antes (etapa 02)")
    _check_rows_match(questions, after_rows, "después (etapa 04)")
    items = []
    for question, before, after in zip(questions, before_rows, after_rows):
        keywords = question.get("palabras_clave", []) if isinstance(question, dict) else []
        fact = question.get("hecho") if isinstance(question, dict) else None
        items.append({
            "question": question_text(question),
            "fact": fact.get("descripcion") if fact else None,
            "before": answer_metrics(before["text"], before["ended_with_eos"], keywords, fact),
            "after": answer_metrics(after["text"], after["ended_with_eos"], keywords, fact),
        })
    aggregate = {
        "before": _side_aggregate(items, before_rows, "before"),
        "after": _side_aggregate(items, after_rows, "after"),
        "questions_with_keywords": sum(1 for item in items if item["after"]["keyword_coverage"] is not None),
        "questions_with_facts": sum(1 for item in items if item["after"]["fact"] is not None),
    }
    contrast = {
        "perplexity": {"before": _finite_or_none(perplexity_before), "after": _finite_or_none(perplexity_after)},
        "questions": items,
        "aggregate": aggregate,
        "probe": probe,
    }
    contrast["verdict"] = verdict(contrast)
    return contrast


def criteria(contrast: dict[str, Any]) -> dict[str, tuple[bool | None, str]]:
    """Each criterion of the verdict: (passed, Spanish reason with its numbers); passed is None if not applicable.

    Keys: eos, spanish, repetition, keywords, facts, probe, perplexity (the reports mark their table rows with
    them). Where the questions carry facts, the fact check decides and keyword coverage is only shown: a keyword
    inside a wrong sentence would pass it.
    """
    facts_check = _check_facts(contrast)
    keywords = _check_keywords(contrast)
    if facts_check[0] is not None:
        keywords = (None, "Informativa: " + keywords[1].split(": ", 1)[-1])
    return {
        "eos": _check_eos(contrast),
        "spanish": _check_spanish(contrast),
        "repetition": _check_repetition(contrast),
        "keywords": keywords,
        "facts": facts_check,
        "probe": _check_probe(contrast),
        "perplexity": _check_perplexity(contrast),
    }


def verdict(contrast: dict[str, Any]) -> dict[str, Any]:
    """{"ready": bool, "reasons": [one Spanish line per criterion, passed or failed, with its numbers]}."""
    checks = criteria(contrast).values()
    return {"ready": all(passed for passed, _ in checks if passed is not None),
            "reasons": [reason for _, reason in checks]}


def load_answers(path: str | Path) -> list[dict[str, Any]]:
    """Read the answer rows a stage wrote (antes.jsonl / despues.jsonl); UserError if missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"No existe {path}: ejecuta antes la etapa que genera esas respuestas.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, línea {number}: no es JSON válido ({spanish_json_error(err)}).") from None
        for field, kind in (("question", str), ("text", str), ("ended_with_eos", bool)):
            if not isinstance(row, dict) or not isinstance(row.get(field), kind):
                raise UserError(f"{path}, línea {number}, campo '{field}': falta o tiene un tipo incorrecto.")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- helpers


def _check_rows_match(questions: Sequence[Any], rows: Sequence[dict[str, Any]], label: str) -> None:
    if len(rows) != len(questions):
        raise UserError(f"Las respuestas de {label} son {len(rows)} y las preguntas de contraste {len(questions)}: "
                        f"el fichero de preguntas cambió entre etapas. Vuelve a ejecutar la etapa 02 con el mismo "
                        f"fichero de preguntas (o restaura el original).")
    for number, (question, row) in enumerate(zip(questions, rows), start=1):
        if " ".join(row.get("question", "").split()) != " ".join(question_text(question).split()):
            raise UserError(f"La respuesta {number} de {label} es de otra pregunta ('{row.get('question', '')}' en "
                            f"lugar de '{question_text(question)}'): el fichero de preguntas cambió entre etapas.")


def _side_aggregate(items: list[dict[str, Any]], rows: Sequence[dict[str, Any]], side: str) -> dict[str, Any]:
    answers = [item[side] for item in items]
    counts = [spanish_word_count(a["text"]) for a in answers]
    all_words = sum(total for _, total in counts)
    coverages = [a["keyword_coverage"] for a in answers if a["keyword_coverage"] is not None]
    repeats = [a["repeated_3gram_ratio"] for a in answers]
    new_tokens = [row["new_tokens"] for row in rows if isinstance(row.get("new_tokens"), int)]
    n = len(answers)
    return {
        "answers": n,
        "ended_with_eos": sum(1 for a in answers if a["ended_with_eos"]),
        "ended_with_eos_share": _rounded(sum(1 for a in answers if a["ended_with_eos"]) / n if n else None),
        "words": all_words,
        "spanish_ratio": _rounded(sum(s for s, _ in counts) / all_words if all_words else 0.0),
        "spanish_ratio_mean": _rounded(_mean([a["spanish_ratio"] for a in answers])),
        "repeated_3gram_ratio_mean": _rounded(_mean(repeats)),
        "repeated_3gram_ratio_max": _rounded(max(repeats) if repeats else None),
        "keyword_coverage_mean": _rounded(_mean(coverages)),
        "new_tokens_mean": _rounded(_mean(new_tokens), 1),
    }


def _check_eos(contrast: dict[str, Any]) -> tuple[bool, str]:
    after, before = contrast["aggregate"]["after"], contrast["aggregate"]["before"]
    n, ended = after["answers"], after["ended_with_eos"]
    context = f"(antes: {before['ended_with_eos']} de {before['answers']})"
    if n and ended == n:
        return True, f"Cumple: las {n} respuestas de después terminan con EOS, el modelo sabe parar {context}."
    cut = [i for i, item in enumerate(contrast["questions"], start=1) if not item["after"]["ended_with_eos"]]
    return False, (f"No cumple: {n - ended} de {n} respuestas de después no terminan con EOS, se cortaron en el "
                   f"límite de tokens ({_list_numbers(cut)}) {context}.")


def _check_spanish(contrast: dict[str, Any]) -> tuple[bool, str]:
    after = contrast["aggregate"]["after"]["spanish_ratio"]
    before = contrast["aggregate"]["before"]["spanish_ratio"]
    text = (f"el {percent(after)} de las palabras de después está en español (mínimo "
            f"{percent(MIN_SPANISH_RATIO, 0)}; antes: {percent(before)}).")
    if after >= MIN_SPANISH_RATIO:
        return True, "Cumple: " + text
    return False, "No cumple: solo " + text


def _check_repetition(contrast: dict[str, Any]) -> tuple[bool, str]:
    ratios = [item["after"]["repeated_3gram_ratio"] for item in contrast["questions"]]
    before_max = contrast["aggregate"]["before"]["repeated_3gram_ratio_max"]
    worst = max(ratios) if ratios else 0.0
    limit = percent(MAX_REPEATED_3GRAM_RATIO, 0)
    context = f"máximo de después {percent(worst)}; antes {percent(before_max or 0.0)}"
    looping = [i for i, ratio in enumerate(ratios, start=1) if ratio > MAX_REPEATED_3GRAM_RATIO]
    if not looping:
        return True, f"Cumple: ninguna respuesta de después repite más del {limit} de sus 3-gramas ({context})."
    return False, (f"No cumple: {len(looping)} respuesta(s) de después repiten más del {limit} de sus 3-gramas, "
                   f"señal de bucle ({_list_numbers(looping)}; {context}).")


def _check_keywords(contrast: dict[str, Any]) -> tuple[bool | None, str]:
    with_keywords = contrast["aggregate"]["questions_with_keywords"]
    if not with_keywords:
        return None, "No aplica: ninguna pregunta tiene palabras clave, no se mide su cobertura."
    after = contrast["aggregate"]["after"]["keyword_coverage_mean"]
    before = contrast["aggregate"]["before"]["keyword_coverage_mean"]
    text = (f"cobertura media de palabras clave de después {number(after)} en {with_keywords} pregunta(s) "
            f"(antes {number(before)}; se exige no empeorar y al menos {number(MIN_KEYWORD_COVERAGE)})")
    if after >= before and after >= MIN_KEYWORD_COVERAGE:
        return True, f"Cumple: {text}."
    problem = "empeora respecto a antes" if after < before else "no llega al mínimo"
    return False, f"No cumple: {text}; {problem}."


def _check_facts(contrast: dict[str, Any]) -> tuple[bool | None, str]:
    checked = [(i, item) for i, item in enumerate(contrast["questions"], start=1) if item["after"].get("fact")]
    if not checked:
        return None, "No aplica: ninguna pregunta trae un hecho que comprobar."
    passed = [i for i, item in checked if item["after"]["fact"]["passed"]]
    with_error = [i for i, item in checked if item["after"]["fact"]["states_error"]]
    before = sum(1 for _, item in checked if item["before"].get("fact") and item["before"]["fact"]["passed"])
    text = (f"{len(passed)} de {len(checked)} respuestas de después afirman el hecho corregido sin el error "
            f"(antes: {before})")
    if len(passed) == len(checked):
        return True, f"Cumple: {text}."
    missing = [i for i, _ in checked if i not in passed]
    extra = f"; repiten el error: {_list_numbers(with_error)}" if with_error else ""
    return False, f"No cumple: {text}; faltan {_list_numbers(missing)}{extra}."


def _check_probe(contrast: dict[str, Any]) -> tuple[bool | None, str]:
    probe = contrast.get("probe")
    if not probe or not probe.get("pairs"):
        return None, "No aplica: no se midió la sonda de errores."
    text = (f"en la sonda de errores la afirmación verdadera gana en {probe['true_wins_after']} de {probe['pairs']} "
            f"pares ({percent(probe['share_after'], 0)}; antes {probe['true_wins_before']}, "
            f"{percent(probe['share_before'], 0)}; mínimo {percent(MIN_PROBE_SHARE, 0)})")
    if probe["share_after"] >= MIN_PROBE_SHARE:
        return True, f"Cumple: {text}."
    return False, f"No cumple: {text}."


def _check_perplexity(contrast: dict[str, Any]) -> tuple[bool, str]:
    before, after = contrast["perplexity"]["before"], contrast["perplexity"]["after"]
    if before is None or after is None:
        return False, "No cumple: falta la perplejidad de antes o de después en el conjunto de evaluación."
    change = (after - before) / before
    text = (f"la perplejidad en el conjunto de evaluación pasa de {number(before)} a {number(after)} "
            f"({'+' if change >= 0 else '−'}{percent(abs(change))})")
    if after < before:
        return True, f"Cumple: {text}; el modelo predice mejor respuestas que no vio al entrenar."
    return False, f"No cumple: {text}; debía bajar."


def number(value: float | None, digits: int = 2) -> str:
    """Spanish decimal notation (comma), as the reports print it."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}".replace(".", ",")


def percent(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{number(value * 100, digits)} %"


def _list_numbers(numbers: list[int]) -> str:
    """'pregunta 3' or 'preguntas 1, 4'."""
    return ("pregunta " if len(numbers) == 1 else "preguntas ") + ", ".join(str(n) for n in numbers)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 4)
