"""04 --eval-file: the perplexity set is read with the same checks as the training data."""

from __future__ import annotations

import pytest

from conftest import ROOT

from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.stages.stage_export import _eval_entries


def test_eval_file_is_read_and_checked(tmp_path):
    entries, source = _eval_entries(OutputLayout.at(tmp_path), str(ROOT / "evaluacion_ciencia.json"))
    assert len(entries) == 30 and source.endswith("evaluacion_ciencia.json")
    assert all(e["instruction"] and e["output"] for e in entries)


def test_bad_eval_file_names_entry_and_field(tmp_path):
    bad = tmp_path / "malo.json"
    bad.write_text('[{"instruction": "¿Qué es el ATP?", "output": ""}]', encoding="utf-8")
    with pytest.raises(UserError) as err:
        _eval_entries(OutputLayout.at(tmp_path), str(bad))
    assert "malo.json" in str(err.value) and "output" in str(err.value)
