"""The training order: long essays and short answers interleaved evenly, the held-out split, packing checks.

Kinds: an entry is "long" when its output has at least LONG_MIN_WORDS words. The course essays run 150-220
words, short answers 8-40 and medium explanations 45-140 (tu_dataset.json: 20-37, 93-123 and 194-219), so 150
sits in the gap below the essays; a cut at 100 would split the medium answers at random.

Interleaving: each kind is shuffled with the seed, then merged so that after n examples exactly
floor(n * p + 1/2) of them are long (p = share of long). Any window of K consecutive examples then holds
round((a+K)p) - round(ap) long ones, which differs from K*p by less than 1: the long share of every window
is within 1/K of p. With an explicit mix_ratio the stream is lengthened until both kinds fit at that ratio,
so the scarcer kind is repeated (reshuffled each pass), never dropped; more than MAX_REPEATS passes is refused.

Packing: sequential (order-preserving) packing cuts this stream into rows of max_seq_length tokens; a window
of rows is a contiguous run of the stream, so the same bound holds per window of rows. `packing_mix` checks
it on real token lengths. Best-fit-decreasing packing (TRL's "bfd") sorts by length and would put the essays
together, which is why the trainer must pack sequentially when packing is on.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from afinar.core.errors import UserError

LONG_MIN_WORDS = 150
MAX_REPEATS = 4

_WORD = re.compile(r"\S+")


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def is_long(entry: dict) -> bool:
    return word_count(entry["output"]) >= LONG_MIN_WORDS


def long_flags(entries: list[dict]) -> list[bool]:
    return [is_long(entry) for entry in entries]


@dataclass
class MixResult:
    order: list[dict]
    flags: list[bool]  # is_long per position of `order`
    ratio: float  # share of long the stream follows
    repeated: int  # extra copies added to honour mix_ratio (0 without it)


def _cycle(items: list, rng: random.Random):
    """Endless passes over items, each pass reshuffled (the first keeps the given shuffle)."""
    current = list(items)
    while True:
        yield from current
        current = list(items)
        rng.shuffle(current)


def interleave(entries: list[dict], *, mix_ratio: float | None = None, seed: int = 42) -> MixResult:
    """Deterministic order in which long and short entries are spread evenly (see module docstring)."""
    rng = random.Random(seed)
    flags = long_flags(entries)
    longs = [e for e, f in zip(entries, flags) if f]
    shorts = [e for e, f in zip(entries, flags) if not f]
    rng.shuffle(longs)
    rng.shuffle(shorts)
    if mix_ratio is not None and not 0.0 < mix_ratio < 1.0:
        raise UserError(f"mix_ratio debe estar entre 0 y 1 (sin incluirlos); se recibió {mix_ratio}.")
    if not longs or not shorts:
        only = longs or shorts
        return MixResult(order=only, flags=[bool(longs)] * len(only), ratio=1.0 if longs else 0.0, repeated=0)
    if mix_ratio is None:
        ratio, total = len(longs) / len(entries), len(entries)
    else:
        ratio = mix_ratio
        total = max(math.ceil(len(longs) / ratio), math.ceil(len(shorts) / (1.0 - ratio)))
        _check_repeats(len(longs), len(shorts), ratio, total)
    long_source, short_source = _cycle(longs, rng), _cycle(shorts, rng)
    order, out_flags, taken_long = [], [], 0
    for n in range(1, total + 1):
        take_long = math.floor(n * ratio + 0.5) > taken_long
        taken_long += take_long
        order.append(next(long_source) if take_long else next(short_source))
        out_flags.append(take_long)
    return MixResult(order=order, flags=out_flags, ratio=ratio, repeated=total - len(entries))


def _check_repeats(n_long: int, n_short: int, ratio: float, total: int) -> None:
    wanted_long = math.floor(total * ratio + 0.5)
    for kind, have, want in (("largas", n_long, wanted_long), ("cortas", n_short, total - wanted_long)):
        passes = want / have
        if passes > MAX_REPEATS:
            raise UserError(
                f"Con mix_ratio={ratio} las {have} respuestas {kind} tendrían que repetirse {passes:.1f} veces "
                f"por época (máximo {MAX_REPEATS}). Elige un mix_ratio más cercano a la proporción real de los "
                "datos o añade más ejemplos de ese tipo."
            )


def window_deviations(flags: list[bool], ratio: float, window: int) -> list[float]:
    """|long share - ratio| for every window of `window` consecutive examples (one window if shorter)."""
    size = min(window, len(flags))
    if size == 0:
        return []
    count = sum(flags[:size])
    deviations = [abs(count / size - ratio)]
    for end in range(size, len(flags)):
        count += flags[end] - flags[end - size]
        deviations.append(abs(count / size - ratio))
    return deviations


def worst_window_deviation(flags: list[bool], ratio: float, window: int) -> float:
    return max(window_deviations(flags, ratio, window), default=0.0)


# --------------------------------------------------------------------------------------------------- packing


def pack_sequential(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Rows of example indices, in stream order: an example that does not fit starts a new row.

    An example longer than max_seq_length is truncated to it and fills a row on its own.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        length = min(length, max_seq_length)
        if current and used + length > max_seq_length:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def packing_mix(
    lengths: list[int],
    flags: list[bool],
    max_seq_length: int,
    rows_per_window: int = 4,
    ratio: float | None = None,
) -> dict:
    """How the long/short mix looks after sequential packing, per window of `rows_per_window` rows.

    `ratio` is the share of long the stream was built for (default: the share in `flags`).
    """
    rows = pack_sequential(lengths, max_seq_length)
    if ratio is None:
        ratio = sum(flags) / len(flags) if flags else 0.0
    windows = []
    size = min(rows_per_window, len(rows))
    for start in range(0, len(rows) - size + 1):
        members = [i for row in rows[start : start + size] for i in row]
        n_long = sum(flags[i] for i in members)
        windows.append((len(members), n_long))
    worst_share = max((abs(n_long / n - ratio) for n, n_long in windows), default=0.0)
    worst_count = max((abs(n_long - ratio * n) for n, n_long in windows), default=0.0)
    per_row = [len(row) for row in rows]
    return {
        "rows": len(rows),
        "examples_per_row_min": min(per_row, default=0),
        "examples_per_row_max": max(per_row, default=0),
        "rows_per_window": size,
        "long_share": round(ratio, 4),
        "worst_window_share_deviation": round(worst_share, 4),
        "worst_window_count_deviation": round(worst_count, 4),
    }


# --------------------------------------------------------------------------------------------------- held-out split


def _largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split `total` across groups proportionally to `sizes` (integers, summing to total)."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def hold_out(entries: list[dict], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): `fraction` of the entries (at least 1), stratified long/short.

    Returns no eval entries when fraction is 0 or there are fewer than 2 entries (training needs one).
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"eval_fraction debe estar entre 0 y 1; se recibió {fraction}.")
    if fraction == 0.0 or len(entries) < 2:
        return list(range(len(entries))), []
    n_eval = min(max(1, round(fraction * len(entries))), len(entries) - 1)
    flags = long_flags(entries)
    groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]
    groups = [g for g in groups if g]
    rng = random.Random(seed)
    eval_indices: list[int] = []
    for group, share in zip(groups, _largest_remainder(n_eval, [len(g) for g in groups])):
        shuffled = list(group)
        rng.shuffle(shuffled)
        eval_indices += shuffled[:share]
    chosen = set(eval_indices)
    return [i for i in range(len(entries)) if i not in chosen], sorted(eval_indices)
