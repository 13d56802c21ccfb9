"""Does an answer state the corrected fact, and not the old error? Checked sentence by sentence.

Keyword coverage counts "agua" in "El oxígeno se libera por los estomas del CO2 y del agua" as a hit. Here a
question of `preguntas_contraste.json` may carry a `hecho`:

    "hecho": {"descripcion": "el oxígeno procede del agua",
              "afirma": ["(oxigeno|o2)[^.]{0,80}\\\\b(agua|h2o)\\\\b", ...],
              "error": ["(oxigeno|o2)[^.]{0,60}\\\\b(co2|dioxido de carbono)\\\\b", ...]}

The patterns are regular expressions over the answer folded to lower case without accents ("oxígeno" →
"oxigeno", "CO₂" → "co2"), applied to one sentence at a time. An answer states the fact when some sentence
matches an `afirma` pattern without a negation before the matched claim, and states the error when some
sentence matches an `error` pattern the same way. A sentence that presents the error as such ("es un
error", "es falso", "se cree que", "mito") states neither. The answer passes when it states the fact and not
the error.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_SENTENCE = re.compile(r"[^.!?;:\n]+")
_NEGATIONS = frozenset("no ni nunca jamas tampoco apenas".split())  # "apenas absorbe la verde"
# A sentence that reports the misconception in order to deny it.
_REPORTED = re.compile(r"\b(es|son|seria|resulta) (un |una )?(error|falso|falsa|incorrect[oa]|mito|equivocad[oa])|"
                       r"\bse (cree|piensa|suele pensar|suele creer|dice)\b|\b(idea|creencia|concepcion) "
                       r"(erronea|equivocada|falsa|popular|comun)|\bmito\b|\berroneamente\b|\bfalso que\b")
NEGATION_WINDOW = 5  # words before the claim's last word that can negate it ("no procede del dióxido de carbono")


def fold(text: str) -> str:
    text = text.replace("₂", "2").replace("₃", "3").replace("₆", "6").replace("₁", "1").lower()
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def compile_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Raises re.error for a bad pattern (afinar.evaluate.questions turns it into a message)."""
    return {"descripcion": spec.get("descripcion", ""),
            "afirma": [re.compile(p) for p in spec.get("afirma", [])],
            "error": [re.compile(p) for p in spec.get("error", [])]}


def _negated(sentence: str, match: re.Match) -> bool:
    # The claim ends with the match's last word; a negation among the few words before it turns it around
    # ("el oxígeno no procede del CO2"), while "no del CO2, sino del agua" still states the water.
    words = re.findall(r"\w+", sentence[:match.end()])
    return any(w in _NEGATIONS for w in words[-(NEGATION_WINDOW + 1):-1])


def _stated(sentences: list[str], patterns: list[re.Pattern]) -> str | None:
    for sentence in sentences:
        if _REPORTED.search(sentence):
            continue
        for pattern in patterns:
            for match in pattern.finditer(sentence):
                if not _negated(sentence, match):
                    return sentence.strip()
    return None


def check(text: str, spec: dict[str, Any]) -> dict[str, Any]:
    """{"states_fact", "states_error", "passed", "fact_sentence", "error_sentence"} for one answer."""
    compiled = compile_spec(spec)  # re caches compiled patterns, so per-call compiling costs nothing
    sentences = _SENTENCE.findall(fold(text))
    fact = _stated(sentences, compiled["afirma"])
    error = _stated(sentences, compiled["error"])
    return {"states_fact": fact is not None, "states_error": error is not None,
            "passed": fact is not None and error is None, "fact_sentence": fact, "error_sentence": error}
