"""Duplicate and language screening, on their own and through prepare()."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from afinar.data import pipeline as data
from afinar.data.data_check import read_dataset
from afinar.data.data_clean import (
    NEAR_DUPLICATE_THRESHOLD, clean, find_exact_duplicates, find_near_duplicates, flag_non_spanish, guess_language,
)

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from synthetic_entries import entries as synthetic_entries  # noqa: E402


def _with_input(rows):
    return [dict(r, input=r.get("input", "")) for r in rows]


def _edit_one_word(entry: dict, rng: random.Random) -> dict:
    words = entry["output"].split()
    words[rng.randrange(len(words))] = "distinto"
    return dict(entry, output=" ".join(words))


def test_exact_duplicates_ignore_case_and_whitespace():
    base = _with_input(synthetic_entries(5, seed=1))
    copy = dict(base[2], output="  " + base[2]["output"].upper().replace(" ", "   \n"))
    other_field = dict(base[3], input=base[3]["output"], output="")  # same words, different fields
    duplicates = find_exact_duplicates(base + [copy, other_field])
    assert [(d.index, d.kept) for d in duplicates] == [(5, 2)]


def test_near_duplicates_found_and_paraphrases_spared():
    rng = random.Random(7)
    base = _with_input(synthetic_entries(300, long_share=0.3, seed=2))
    # One word in a very short entry is a real change (5 of 13 shingles); the documented reach is an
    # entry of 30 words or more.
    eligible = [i for i, e in enumerate(base) if len(e["instruction"].split() + e["output"].split()) >= 30]
    planted = {300 + k: i for k, i in enumerate(rng.sample(eligible, 20))}
    rows = base + [_edit_one_word(base[i], rng) for i in planted.values()]
    found = {d.index: d for d in find_near_duplicates(rows)}
    assert set(found) == set(planted)
    for index, source in planted.items():
        assert found[index].kept == source
        assert NEAR_DUPLICATE_THRESHOLD <= found[index].similarity < 1.0
    # Real paraphrases (same fact, different wording) are not near duplicates.
    pair = [
        {"instruction": "¿De dónde procede el oxígeno que liberan las plantas?", "input": "",
         "output": "Procede de la fotólisis del agua en el fotosistema II, no del dióxido de carbono."},
        {"instruction": "¿Es cierto que el O2 que desprende una hoja viene del CO2?", "input": "",
         "output": "No. El O2 sale de la ruptura del agua en el fotosistema II; el carbono del CO2 va a los azúcares."},
    ]
    assert find_near_duplicates(pair) == []


def test_clean_drops_duplicates_unless_kept():
    rows = _with_input(synthetic_entries(30, seed=4))
    rows += [dict(rows[0]), _edit_one_word(rows[1], random.Random(1))]
    dropped = clean(rows)
    assert dropped.kept == list(range(30))
    assert len(dropped.exact) == 1 and len(dropped.near) == 1 and dropped.dropped_duplicates == 2
    kept = clean(rows, keep_duplicates=True)
    assert kept.kept == list(range(32))
    assert len(kept.exact) == 1 and len(kept.near) == 1 and kept.dropped_duplicates == 0


def test_non_spanish_flagged_and_short_texts_spared():
    entries = read_dataset(FIXTURES / "idiomas_mezclados.jsonl").entries
    flags = {f.index: f for f in flag_non_spanish(entries)}
    assert set(flags) == {1, 2, 3}
    assert flags[1].language == "en" and flags[3].language == "fr"
    assert guess_language(entries[5]) == (None, 0.0)  # "Define ATP." is too short to judge
    result = clean(entries, drop_non_spanish=True)
    assert result.kept == [0, 4, 5, 6] and result.dropped_non_spanish == 3
    assert clean(entries).kept == list(range(7))


def test_prepare_reports_cleaning(tmp_path, capsys):
    rows = synthetic_entries(40, seed=9)
    rows += [dict(rows[5]), dict(rows[6], output=rows[6]["output"] + " ")]  # two exact duplicates
    rows += [{"instruction": "Explain in detail why the sky looks blue during the day.",
              "output": "Sunlight is scattered by the molecules of the air, and blue light is scattered much more."}]
    path = tmp_path / "datos.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepared = data.prepare(path, eval_fraction=0, drop_non_spanish=True)
    cleaning = prepared.summary["cleaning"]
    assert cleaning["exact_duplicates"] == 2 and cleaning["duplicates_dropped"] == 2
    assert cleaning["non_spanish"] == 1 and cleaning["non_spanish_dropped"] == 1
    assert "entrada 43: idioma «en»" in cleaning["non_spanish_examples"][0]
    assert "entrada 41 repite entrada 6 (idéntica)" in cleaning["duplicate_examples"]
    assert len(prepared.train) == 40
    assert "duplicados exactos: 2; casi duplicados: 0; se descartan." in capsys.readouterr().out
    kept = data.prepare(path, eval_fraction=0, keep_duplicates=True)
    assert len(kept.train) == 43 and kept.summary["cleaning"]["exact_duplicates"] == 2
