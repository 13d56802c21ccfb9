"""The contrast test: per-answer metrics, their aggregates, and the verdict "ready or not".

Metrics of one answer:
- ended_with_eos: the model stopped on its own before the token limit (a model that never stops loops).
- spanish_ratio: share of its words in Spanish (see `spanish_ratio` for the method).
- repeated_3gram_ratio: share of its word 3-grams that repeat an earlier one (catches loops).
- keyword_coverage: share of the question's keywords it mentions (None when the question has none).
- fact: for questions with a `hecho`, whether the answer states the corrected fact and not the old error
  (afinar.evaluate.facts); unlike keyword coverage, a right word inside a wrong sentence does not count.
Besides the answers, the misconception probe (afinar.evaluate.probe) and the held-out perplexity enter the verdict.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from afinar.core.errors import UserError
from afinar.evaluate.questions import question_text

# Thresholds of the verdict.
MIN_SPANISH_RATIO = 0.95  # aggregate over all words of the "after" answers
MAX_REPEATED_3GRAM_RATIO = 0.10  # per answer: a tenth of repeated 3-grams is already a visible loop
MIN_KEYWORD_COVERAGE = 0.5  # mean over the questions that have keywords: at least half of the key terms

# py3langid is restricted to Spanish and the languages a small model drifts into (English above all). Catalan
# and Galician are left out on purpose: on short Spanish sentences they win by a hair and would count correct
# Spanish as foreign, and a model trained on Spanish does not drift into them.
LANGUAGES = ("es", "en", "pt", "fr", "it", "de")
SPANISH = "es"
# A segment is Spanish unless another language is at least this many times more probable. Spanish science
# prose shares its Latin vocabulary with Portuguese and Italian: on the project's 500 Spanish texts py3langid
# put such a language first in 19 segments, never by more than 4.1x, while every segment of English,
# Portuguese, Italian and French test paragraphs beat Spanish by 24x or more.
SPANISH_MARGIN = 10.0
MIN_LANGID_WORDS = 3  # below this py3langid guesses (e.g. "No" -> Galician); the word-list heuristic decides
MAX_SEGMENT_WORDS = 12  # long sentences are cut into pieces so a switch of language mid-sentence is seen

_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
_SENTENCE_BREAK = re.compile(r"[.!?;:\n…]+")
_SPANISH_MARKS = set("áéíóúñü¿¡")

# Frequent function words of one language only (words both languages use, such as "no", "a", "me" or "he",
# are left out so they do not vote).
_SPANISH_WORDS = frozenset(
    "el la los las del al un una unos unas y o u que de en es son está están fue ser por para con sin sobre "
    "entre hasta desde pero porque como cuando donde también muy más menos sus su se lo le les ya esto esta "
    "este estos estas eso esa ese otro otra otros otras cada todo toda todos todas hay tiene tienen puede "
    "pueden sí qué cómo cuál cuáles dónde cuándo mucho poco".split()
)
# Spanish words that the Romance neighbours in LANGUAGES lack ("y" is left out: French has "il y a").
_SPANISH_ONLY_WORDS = frozenset("el los las está están también hay muy pero aquí así".split())
_ENGLISH_WORDS = frozenset(
    "the of and or is are was were be been being this that these those with without from for by to into "
    "what which who whom whose when where why how it its they them their there here has have had can could "
    "would should will not yes do does did an at on as than then also very more most such some any each".split()
)


# ---------------------------------------------------------------------------------------------- word metrics


def words(text: str) -> list[str]:
    """Words made of letters (digits, symbols and punctuation are not words)."""
    return _WORD.findall(text or "")


def spanish_ratio(text: str) -> float:
    """Share of the words of `text` that belong to Spanish segments (0.0 for a text without words).

    Language identification of a single word is unreliable ("ADN", "célula" and "No" are all guessed as
    other languages), so the text is cut into segments: sentences, and long sentences into pieces of at most
    MAX_SEGMENT_WORDS words.
    - A segment of MIN_LANGID_WORDS words or more goes to py3langid, restricted to LANGUAGES. If it prefers
      another language, the segment still counts as Spanish when it has a word only Spanish has ("el",
      "los", "-ción"...) and that language is not English, or when that language is less than SPANISH_MARGIN
      times more probable than Spanish.
    - A shorter segment is judged by word lists: Spanish-only function words, accents, ñ, ¿ ¡ against
      English-only function words.
    - A segment with no evidence either way (a lone term such as "ATP") takes the language of the nearest
      decided segment; if none is decided, py3langid judges the whole text, and a text of fewer than
      MIN_LANGID_WORDS words with no evidence counts as Spanish.
    Every word of a Spanish segment counts as Spanish.
    """
    segments = language_segments(text)
    total = sum(len(seg_words) for seg_words, _ in segments)
    if total == 0:
        return 0.0
    return sum(len(seg_words) for seg_words, lang in segments if lang == SPANISH) / total


def spanish_word_count(text: str) -> tuple[int, int]:
    """(Spanish words, all words) of `text`, for word-weighted aggregates."""
    segments = language_segments(text)
    spanish = sum(len(w) for w, lang in segments if lang == SPANISH)
    return spanish, sum(len(w) for w, _ in segments)


def language_segments(text: str) -> list[tuple[list[str], str]]:
    """[(words of the segment, language code)] in text order."""
    pieces = [piece for sentence in _SENTENCE_BREAK.split(text or "") for piece in _split_long(sentence)]
    decided: list[tuple[list[str], str | None]] = [(piece, _segment_language(piece)) for piece in pieces]
    if not decided:
        return []
    if all(lang is None for _, lang in decided):
        all_words = [w for piece, _ in decided for w in piece]
        # Too short to show any language (a lone "ATP" or "Mitocondria"): not held against the answer.
        whole = _identified_language(all_words) if len(all_words) >= MIN_LANGID_WORDS else SPANISH
        return [(piece, whole) for piece, _ in decided]
    return [(piece, lang if lang is not None else _nearest_language(decided, i))
            for i, (piece, lang) in enumerate(decided)]


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


def keyword_coverage(text: str, keywords: Sequence[str]) -> float | None:
    """Share of `keywords` found in `text`, ignoring case and accents; None when there are no keywords.

    A keyword word matches an answer word that starts with its stem (plural and final vowel dropped, so
    "mitocondria" finds "mitocondrias" and "mitocondrial"); words of up to three letters ("ADN", "ATP", "de")
    must match whole. A keyword of several words must appear as consecutive words.
    """
    if not keywords:
        return None
    answer = [_fold(w) for w in words(text)]
    found = sum(1 for keyword in keywords if _contains(answer, [_fold(w) for w in words(keyword)]))
    return found / len(keywords)


def answer_metrics(text: str, ended_with_eos: bool, keywords: Sequence[str],
                   fact: dict[str, Any] | None = None) -> dict[str, Any]:
    from afinar.evaluate import facts

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
            from afinar.data.data_check import spanish_json_error

            raise UserError(f"{path}, línea {number}: no es JSON válido ({spanish_json_error(err)}).") from None
        for field, kind in (("question", str), ("text", str), ("ended_with_eos", bool)):
            if not isinstance(row, dict) or not isinstance(row.get(field), kind):
                raise UserError(f"{path}, línea {number}, campo '{field}': falta o tiene un tipo incorrecto.")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(LANGUAGES))
    return identifier


def _split_long(sentence: str) -> list[list[str]]:
    found = words(sentence)
    if not found:
        return []
    pieces = math.ceil(len(found) / MAX_SEGMENT_WORDS)
    size = math.ceil(len(found) / pieces)
    return [found[i:i + size] for i in range(0, len(found), size)]


def _segment_language(segment: list[str]) -> str | None:
    if len(segment) >= MIN_LANGID_WORDS:
        return _identified_language(segment)
    return _heuristic_language(segment)


def _identified_language(segment: list[str]) -> str:
    ranked = _identifier().rank(" ".join(segment))
    best, best_probability = ranked[0]
    if best == SPANISH:
        return SPANISH
    if best != "en" and _has_spanish_only_marker(segment):
        return SPANISH
    if best_probability >= SPANISH_MARGIN * dict(ranked)[SPANISH]:
        return best
    return SPANISH


def _has_spanish_only_marker(segment: list[str]) -> bool:
    """Articles, words and spellings that Portuguese, Italian and French do not have."""
    for word in segment:
        lowered = word.casefold()
        if lowered in _SPANISH_ONLY_WORDS or lowered.endswith(("ción", "ciones")) or set(lowered) & set("ñ¿¡"):
            return True
    return False


def _heuristic_language(segment: list[str]) -> str | None:
    lowered = [w.casefold() for w in segment]
    spanish = sum(1 for w in lowered if w in _SPANISH_WORDS or _SPANISH_MARKS & set(w))
    english = sum(1 for w in lowered if w in _ENGLISH_WORDS)
    if spanish > english:
        return SPANISH
    if english > spanish:
        return "en"
    return None


def _nearest_language(decided: list[tuple[list[str], str | None]], index: int) -> str:
    for distance in range(1, len(decided)):
        for j in (index - distance, index + distance):
            if 0 <= j < len(decided) and decided[j][1] is not None:
                return decided[j][1]  # type: ignore[return-value]
    raise AssertionError("unreachable: at least one segment is decided")


def _fold(word: str) -> str:
    decomposed = unicodedata.normalize("NFD", word.casefold())
    # Keep ñ distinct from n ("año" is not "ano"); drop every other accent.
    kept = []
    for char in decomposed:
        if unicodedata.combining(char) and not (char == "\u0303" and kept and kept[-1] == "n"):
            continue
        kept.append(char)
    return unicodedata.normalize("NFC", "".join(kept))


def _stem(word: str) -> str:
    if len(word) <= 3:
        return word
    stem = word
    if stem.endswith("es") and len(stem) > 5:
        stem = stem[:-2]
    elif stem.endswith("s") and len(stem) > 4:
        stem = stem[:-1]
    if stem[-1] in "aeo" and len(stem) > 4:
        stem = stem[:-1]
    return stem


def _word_matches(answer_word: str, keyword_word: str) -> bool:
    if len(keyword_word) <= 3:
        return answer_word == keyword_word
    return answer_word.startswith(_stem(keyword_word))


def _contains(answer: list[str], keyword: list[str]) -> bool:
    if not keyword:
        return False
    width = len(keyword)
    return any(all(_word_matches(answer[start + k], keyword[k]) for k in range(width))
               for start in range(len(answer) - width + 1))


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
    from afinar.evaluate.probe import MIN_PROBE_SHARE

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
