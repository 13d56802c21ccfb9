"""Keyword coverage: which of a question's key terms an answer mentions, ignoring case and accents, with a
light Spanish stemming (plural and final vowel) so that "mitocondria" finds "mitocondrias"."""

from __future__ import annotations

import unicodedata
from typing import Sequence

from afinar.evaluate.language import words


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
