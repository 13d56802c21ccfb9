"""Duplicate and language screening of validated entries.

Exact duplicates: same instruction + input + output after folding case and collapsing whitespace.
Near duplicates: Jaccard similarity >= NEAR_DUPLICATE_THRESHOLD between the sets of SHINGLE_WORDS-word
shingles (lower-case word tokens, punctuation ignored) of instruction + input + output. Candidates come from
MinHash signatures (datasketch) banded with the (b, r) that datasketch's MinHashLSH picks for that threshold;
every candidate pair is then confirmed with the exact Jaccard similarity, so the LSH only decides what gets
compared. The bands live in a numpy array instead of MinHashLSH's own index because its one-set-per-bucket
storage took about four times the memory of the entries themselves on 50,000 entries. 3-word shingles and
0.7 catch a one-word edit of a 30-word entry and a two-word edit of a 40-word one (5-word shingles miss
those), while the paraphrased pairs of the course data stay far below (at most 0.15 in tu_dataset.json).
The earliest entry of each group is the one kept, so local entries (read first) win over Hub copies.

Language: py3langid (offline) on instruction + output (their first LANGUAGE_MAX_CHARS characters; `input` is
left out because it is often text to translate or correct). An entry is flagged as not Spanish only when the
text has at least LANGUAGE_MIN_WORDS words, the top language is not Spanish or a variety langid confuses with
it, and that language has probability >= LANGUAGE_MIN_PROBABILITY. Short texts ("Define mitosis.") are
never flagged: with a handful of words the identifier is little better than a guess.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

SHINGLE_WORDS = 3
NEAR_DUPLICATE_THRESHOLD = 0.7
NUM_PERM = 128
MINHASH_SEED = 1
# A band bucket shared by many kept entries (template-like data) is compared against its most recent
# members only, so a pathological file cannot make the screening quadratic.
MAX_COMPARISONS_PER_BUCKET = 32
_BATCH = 2048

LANGUAGE_MIN_WORDS = 6
LANGUAGE_MIN_PROBABILITY = 0.75
# The opening of a text tells its language as well as the whole, and caps the cost of 100,000-char fields.
LANGUAGE_MAX_CHARS = 1000
# langid labels that short or technical Spanish is often given; they are not counted as "foreign".
SPANISH_LIKE = frozenset({"es", "an", "ast", "ext", "lad"})

_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Duplicate:
    index: int  # position in the screened list (0-based)
    kept: int  # the earlier entry it duplicates
    similarity: float  # 1.0 for exact duplicates, the Jaccard similarity for near duplicates


@dataclass(frozen=True)
class LanguageFlag:
    index: int
    language: str
    probability: float


@dataclass
class CleanResult:
    kept: list[int]
    exact: list[Duplicate] = field(default_factory=list)
    near: list[Duplicate] = field(default_factory=list)
    non_spanish: list[LanguageFlag] = field(default_factory=list)
    dropped_duplicates: int = 0
    dropped_non_spanish: int = 0


def _parts(entry: dict) -> list[str]:
    """The texts an entry is compared and judged by: every user and assistant turn of a conversation."""
    if entry.get("turns"):
        return [turn["content"] for turn in entry["turns"] if turn["role"] != "system"]
    return [entry["instruction"], entry.get("input") or "", entry["output"]]


def entry_text(entry: dict) -> str:
    return "\n".join(part for part in _parts(entry) if part)


# --------------------------------------------------------------------------------------------------- exact


def _exact_key(entry: dict) -> bytes:
    parts = (_SPACES.sub(" ", part or "").strip().casefold() for part in _parts(entry))
    # Hashing keeps one 16-byte key per entry instead of a second copy of every text.
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=16).digest()


def find_exact_duplicates(entries: list[dict]) -> list[Duplicate]:
    first_seen: dict[bytes, int] = {}
    duplicates = []
    for index, entry in enumerate(entries):
        key = _exact_key(entry)
        kept = first_seen.setdefault(key, index)
        if kept != index:
            duplicates.append(Duplicate(index, kept, 1.0))
    return duplicates


# --------------------------------------------------------------------------------------------------- near


def shingles(entry: dict, size: int = SHINGLE_WORDS) -> set[bytes]:
    words = _WORD.findall(entry_text(entry).casefold())
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@functools.lru_cache(maxsize=4)
def _lsh_plan(threshold: float, num_perm: int):
    """Band ranges chosen by datasketch for this threshold, the shared permutations and band mixers."""
    from datasketch import MinHash, MinHashLSH

    bands = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges
    prototype = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
    mixers = np.random.default_rng(MINHASH_SEED).integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    return bands, prototype.permutations, prototype.scheme, mixers


def _band_keys(entries: list[dict], indices: list[int], threshold: float, num_perm: int) -> np.ndarray:
    """One 64-bit key per (entry, band); equal keys mean equal MinHash values in that band."""
    from datasketch import MinHash

    bands, permutations, scheme, mixers = _lsh_plan(threshold, num_perm)
    keys = np.empty((len(indices), len(bands)), dtype=np.uint64)
    for start in range(0, len(indices), _BATCH):
        chunk = indices[start : start + _BATCH]
        signatures = np.empty((len(chunk), num_perm), dtype=np.uint64)
        for row, index in enumerate(chunk):
            minhash = MinHash(num_perm=num_perm, permutations=permutations, scheme=scheme)
            minhash.update_batch(shingles(entries[index]))
            signatures[row] = minhash.hashvalues
        mixed = signatures * mixers  # uint64 arithmetic wraps, which is what a hash mix wants
        for band, (lo, hi) in enumerate(bands):
            keys[start : start + len(chunk), band] = mixed[:, lo:hi].sum(axis=1, dtype=np.uint64)
    return keys


def find_near_duplicates(
    entries: list[dict],
    candidates: list[int] | None = None,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    num_perm: int = NUM_PERM,
) -> list[Duplicate]:
    """Near duplicates among `candidates` (indices into entries, default all), earliest kept."""
    indices = list(range(len(entries))) if candidates is None else sorted(candidates)
    if len(indices) < 2:
        return []
    keys = _band_keys(entries, indices, threshold, num_perm)
    group_ids = np.empty(keys.shape, dtype=np.int64)
    shared = np.zeros(keys.shape, dtype=bool)
    for band in range(keys.shape[1]):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        group_ids[:, band] = inverse
        shared[:, band] = counts[inverse] > 1
    kept_in_bucket: dict[tuple[int, int], list[int]] = {}
    duplicates = []
    for row in np.flatnonzero(shared.any(axis=1)):
        buckets = [(band, int(group_ids[row, band])) for band in np.flatnonzero(shared[row])]
        earlier = sorted({c for b in buckets for c in kept_in_bucket.get(b, ())[-MAX_COMPARISONS_PER_BUCKET:]})
        match = _first_similar(entries, indices[row], [indices[c] for c in earlier], threshold)
        if match is not None:
            duplicates.append(Duplicate(indices[row], match[0], round(match[1], 4)))
            continue
        for bucket in buckets:
            kept_in_bucket.setdefault(bucket, []).append(int(row))
    return duplicates


def _first_similar(entries, index: int, earlier: list[int], threshold: float) -> tuple[int, float] | None:
    if not earlier:
        return None
    mine = shingles(entries[index])
    for other in earlier:
        similarity = jaccard(mine, shingles(entries[other]))
        if similarity >= threshold:
            return other, similarity
    return None


# --------------------------------------------------------------------------------------------------- language


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def guess_language(entry: dict) -> tuple[str | None, float]:
    """(language, probability) of instruction + output, or (None, 0.0) when the text is too short to tell."""
    # A conversation is judged on all its turns: a Spanish opening must not hide English answers after it.
    text = (entry_text(entry) if entry.get("turns") else f"{entry['instruction']}\n{entry['output']}")[:LANGUAGE_MAX_CHARS]
    if len(_WORD.findall(text)) < LANGUAGE_MIN_WORDS:
        return None, 0.0
    language, probability = _identifier().classify(text)
    return language, float(probability)


def is_foreign(language: str | None, probability: float) -> bool:
    return language is not None and language not in SPANISH_LIKE and probability >= LANGUAGE_MIN_PROBABILITY


def flag_non_spanish(entries: list[dict], indices: list[int] | None = None) -> list[LanguageFlag]:
    flags = []
    for index in range(len(entries)) if indices is None else indices:
        language, probability = guess_language(entries[index])
        if is_foreign(language, probability):
            flags.append(LanguageFlag(index, language, round(probability, 4)))
    return flags


# --------------------------------------------------------------------------------------------------- together


def clean(entries: list[dict], *, keep_duplicates: bool = False, drop_non_spanish: bool = False) -> CleanResult:
    """Screen entries in order; report duplicates and non-Spanish entries, drop them unless told otherwise."""
    exact = find_exact_duplicates(entries)
    exact_dropped = {dup.index for dup in exact}
    survivors = [i for i in range(len(entries)) if i not in exact_dropped]
    near = find_near_duplicates(entries, survivors)
    duplicate_indices = exact_dropped | {dup.index for dup in near}
    screened = list(range(len(entries))) if keep_duplicates else [i for i in survivors if i not in duplicate_indices]
    non_spanish = flag_non_spanish(entries, screened)
    dropped = set() if keep_duplicates else set(duplicate_indices)
    if drop_non_spanish:
        dropped |= {flag.index for flag in non_spanish}
    kept = [i for i in range(len(entries)) if i not in dropped]
    return CleanResult(
        kept=kept,
        exact=exact,
        near=near,
        non_spanish=non_spanish,
        dropped_duplicates=0 if keep_duplicates else len(duplicate_indices),
        dropped_non_spanish=len({flag.index for flag in non_spanish}) if drop_non_spanish else 0,
    )
