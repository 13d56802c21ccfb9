"""Interleaving of long essays and short answers, its survival through packing, the held-out split."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from afinar.data.data_mix import (
    LONG_MIN_WORDS, MAX_REPEATS, hold_out, interleave, is_long, long_flags, pack_sequential, packing_mix,
    window_deviations, worst_window_deviation,
)
from afinar.core.errors import UserError

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from synthetic_entries import entries as synthetic_entries  # noqa: E402


def _entries(n_long: int, n_short: int, seed: int = 0) -> list[dict]:
    rows = synthetic_entries(3 * (n_long + n_short) + 50, long_share=0.5, seed=seed)
    longs = [r for r in rows if is_long(r)][:n_long]
    shorts = [r for r in rows if not is_long(r)][:n_short]
    assert len(longs) == n_long and len(shorts) == n_short
    return longs + shorts  # all long first: the worst possible input order


def test_long_threshold():
    assert is_long({"output": " ".join(["palabra"] * LONG_MIN_WORDS)})
    assert not is_long({"output": " ".join(["palabra"] * (LONG_MIN_WORDS - 1))})


@pytest.mark.parametrize("n_long, n_short", [(30, 70), (7, 93), (50, 50), (61, 13)])
@pytest.mark.parametrize("window", [4, 8, 16])
def test_every_window_is_within_one_over_k(n_long, n_short, window):
    entries = _entries(n_long, n_short)
    mix = interleave(entries, seed=3)
    assert sorted(map(id, mix.order)) == sorted(map(id, entries))  # each entry exactly once
    assert mix.ratio == pytest.approx(n_long / (n_long + n_short))
    assert long_flags(mix.order) == mix.flags
    deviations = window_deviations(mix.flags, mix.ratio, window)
    assert len(deviations) == len(entries) - window + 1
    # Stated bound: a window of K holds round((a+K)p) - round(ap) long ones, within 1 of K*p.
    assert max(deviations) <= 1.0 / window + 1e-9
    # The input order (all long first) is as bad as it gets; the mix is what fixes it.
    assert worst_window_deviation(long_flags(entries), mix.ratio, window) > 1.0 / window


def test_order_is_deterministic_and_seeded():
    entries = _entries(20, 40)
    first = [id(e) for e in interleave(entries, seed=11).order]
    assert first == [id(e) for e in interleave(entries, seed=11).order]
    assert first != [id(e) for e in interleave(entries, seed=12).order]


def test_mix_ratio_repeats_the_scarce_kind():
    entries = _entries(10, 60)
    mix = interleave(entries, mix_ratio=0.4, seed=1)
    assert mix.ratio == 0.4
    assert {id(e) for e in entries} <= {id(e) for e in mix.order}  # nothing dropped
    assert sum(mix.flags) == round(0.4 * len(mix.order))
    assert mix.repeated == len(mix.order) - len(entries) > 0
    assert worst_window_deviation(mix.flags, 0.4, 8) <= 1 / 8 + 1e-9
    with pytest.raises(UserError, match="tendrían que repetirse"):
        interleave(entries, mix_ratio=0.5 + 0.5 * (1 - 1 / (MAX_REPEATS + 3)), seed=1)
    with pytest.raises(UserError, match="mix_ratio"):
        interleave(entries, mix_ratio=1.0)


def test_single_kind_is_just_shuffled():
    entries = _entries(0, 12)
    mix = interleave(entries, seed=2)
    assert sorted(map(id, mix.order)) == sorted(map(id, entries)) and not any(mix.flags)


# --------------------------------------------------------------------------------------------------- packing


def _token_lengths(flags: list[bool], seed: int) -> list[int]:
    rng = random.Random(seed)  # essays ~ 260-420 tokens, short answers ~ 90-200, as the course data measures
    return [rng.randint(260, 420) if f else rng.randint(90, 200) for f in flags]


def _pack_best_fit_decreasing(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    rows: list[tuple[int, list[int]]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in rows if r[0] + lengths[index] <= max_seq_length]
        if fits:
            best = min(fits, key=lambda r: max_seq_length - r[0] - lengths[index])
            rows[rows.index(best)] = (best[0] + lengths[index], best[1] + [index])
        else:
            rows.append((lengths[index], [index]))
    return [members for _, members in rows]


def test_pack_sequential_keeps_order_and_limits():
    rows = pack_sequential([500, 400, 200, 1500, 10, 1000], 1024)
    assert rows == [[0, 1], [2], [3], [4, 5]]
    assert [i for row in rows for i in row] == list(range(6))


def test_mix_survives_sequential_packing_but_not_bfd():
    entries = _entries(60, 140)
    mix = interleave(entries, seed=5)
    lengths = _token_lengths(mix.flags, seed=5)
    report = packing_mix(lengths, mix.flags, max_seq_length=1024, rows_per_window=2)
    assert report["rows"] > 20 and report["examples_per_row_min"] >= 2
    # A window of rows is a contiguous run of the stream, so the interleave bound still holds:
    # |long - p*m| < 1 for every window of m examples.
    assert report["worst_window_count_deviation"] < 1.0
    rows = pack_sequential(lengths, 1024)
    for row in rows:
        n_long = sum(mix.flags[i] for i in row)
        assert abs(n_long - mix.ratio * len(row)) < 1.0
    # Best-fit-decreasing (TRL's "bfd") regroups by length: rows of essays only appear, the mix is lost.
    bfd_rows = _pack_best_fit_decreasing(lengths, 1024)
    bfd_share = [sum(mix.flags[i] for i in row) / len(row) for row in bfd_rows]
    assert max(abs(s - mix.ratio) for s in bfd_share) > 0.5


# --------------------------------------------------------------------------------------------------- held-out split


def test_hold_out_is_stratified_deterministic_and_disjoint():
    entries = _entries(30, 70)
    train, held = hold_out(entries, 0.1, seed=4)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert sum(is_long(entries[i]) for i in held) == 3
    assert (train, held) == hold_out(entries, 0.1, seed=4)
    assert held != hold_out(entries, 0.1, seed=5)[1]


def test_hold_out_edges():
    entries = _entries(1, 4)
    assert len(hold_out(entries, 0.01, seed=0)[1]) == 1  # at least one
    assert hold_out(entries, 0.0, seed=0) == (list(range(5)), [])
    assert hold_out(entries[:1], 0.5, seed=0) == ([0], [])  # training needs the only entry
    with pytest.raises(UserError):
        hold_out(entries, 1.0, seed=0)
