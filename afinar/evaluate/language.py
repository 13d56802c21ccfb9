"""Which language an answer is in: segments of a text judged by py3langid and by word lists, and the share of
its words that are Spanish (the contrast test's `spanish_ratio`)."""

from __future__ import annotations

import math
import re
from functools import lru_cache

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
