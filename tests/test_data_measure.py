"""Token lengths with the embedded model's tokenizer and chat template; the full prepare() with its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from afinar.data import pipeline as data
from afinar.core import embedded
from afinar.data.data_measure import describe, token_lengths, token_summary
from afinar.data.data_mix import is_long, long_flags, worst_window_deviation
from afinar.core.layout import OutputLayout
from afinar.core.prompts import IGNORE_INDEX, tokenize_example

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from synthetic_entries import entries as synthetic_entries  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded.ensure_checkpoint(verbose=False))


def test_describe_uses_nearest_rank():
    stats = describe(list(range(1, 101)))
    assert stats == {"count": 100, "mean": 50.5, "p50": 50, "p90": 90, "p95": 95, "p99": 99, "min": 1, "max": 100}
    assert describe([7]) ["p99"] == 7


def test_token_lengths_match_the_training_tokenization(tokenizer):
    rows = synthetic_entries(12, long_share=0.5, seed=8)
    rows = [dict(r, input=r.get("input", "")) for r in rows]
    lengths = token_lengths(tokenizer, rows)
    for row, (prompt, response) in zip(rows, lengths):
        example = tokenize_example(tokenizer, row, max_seq_length=10**9)
        assert prompt + response == len(example["input_ids"])
        assert response == sum(1 for label in example["labels"] if label != IGNORE_INDEX)
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        assert response == len(tokenizer(row["output"].strip(), add_special_tokens=False)["input_ids"]) + 1
    flags = long_flags(rows)
    summary = token_summary(lengths, flags, max_seq_length=300)
    totals = [p + r for p, r in lengths]
    assert summary["count"] == 12 and summary["max"] == max(totals)
    assert summary["truncated"] == sum(t > 300 for t in totals) > 0
    assert summary["long"]["count"] == sum(flags) and summary["long"]["mean"] > summary["short"]["mean"]
    assert summary["prompt"]["max"] == max(p for p, _ in lengths)


def test_prepare_writes_report_histogram_and_eval_split(tmp_path, tokenizer, capsys):
    rows = synthetic_entries(120, long_share=0.3, seed=12)
    path = tmp_path / "curso.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    layout = OutputLayout.at(tmp_path / "salida")
    prepared = data.prepare(path, tokenizer=tokenizer, max_seq_length=256, layout=layout, window=8, seed=3)
    summary = prepared.summary
    json.dumps(summary)  # goes into run.json as is

    assert summary["eval"] == len(prepared.eval) == 12
    assert summary["train"] == len(prepared.train) == 108
    train_keys = {(e["instruction"], e["output"]) for e in prepared.train}
    assert not train_keys & {(e["instruction"], e["output"]) for e in prepared.eval}
    assert sum(is_long(e) for e in prepared.eval) == round(0.1 * 120 * sum(is_long(r) for r in rows) / 120)
    written = [json.loads(line) for line in layout.eval_split.read_text(encoding="utf-8").splitlines()]
    assert written == prepared.eval

    flags = long_flags(prepared.train)
    assert worst_window_deviation(flags, summary["mix"]["ratio"], 8) == summary["mix"]["worst_window_deviation"]
    assert summary["mix"]["worst_window_deviation"] <= 1 / 8

    tokens = summary["tokens"]
    assert tokens["count"] == 108 and tokens["max_seq_length"] == 256
    assert tokens["truncated"] == sum(1 for e in prepared.train if is_long(e))  # every essay exceeds 256 tokens
    assert summary["packing"]["worst_window_count_deviation"] < 1.0

    report = layout.data_report.read_text(encoding="utf-8")
    assert report.startswith("# Informe de datos de entrenamiento")
    assert "## Longitud en tokens" in report and f"max_seq_length=256: {tokens['truncated']}" in report
    assert f"| p95 | {tokens['p95']} |" in report and "longitudes.png" in report
    assert layout.data_histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Evaluación: 12 entradas apartadas" in out and "Tokens: p50" in out


def test_prepare_without_eval_removes_a_stale_split(tmp_path):
    rows = synthetic_entries(20, seed=1)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    layout = OutputLayout.at(tmp_path / "salida")
    data.prepare(path, layout=layout)
    assert layout.eval_split.exists()
    prepared = data.prepare(path, layout=layout, eval_fraction=0)
    assert prepared.eval == [] and len(prepared.train) == 20 and not layout.eval_split.exists()
    assert prepared.summary["tokens"] is None and "Sin tokenizador" in layout.data_report.read_text(encoding="utf-8")
