"""--hub-dataset: local copies shaped like each known Hub set, column aliases, limits, offline errors, mixing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from afinar.data import pipeline as data
from afinar.core.errors import UserError
from afinar.data.hub_datasets import KNOWN_HUB_SETS, HubSpec, load_hub_entries, parse_hub_spec

FIXTURES = Path(__file__).parent / "fixtures"
BERTIN = FIXTURES / "hub_bertin_alpaca_spanish.jsonl"
PLNCMM = FIXTURES / "hub_plncmm_spanish_alpaca.json"
SAILLAB = FIXTURES / "hub_saillab_alpaca_spanish_cleaned.jsonl"
ALIASES = FIXTURES / "hub_alias_columns.csv"
sys.path.insert(0, str(FIXTURES))
from synthetic_entries import entries as synthetic_entries  # noqa: E402


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_parse_hub_spec():
    assert parse_hub_spec("bertin-project/alpaca-spanish:500") == HubSpec("bertin-project/alpaca-spanish", 500)
    assert parse_hub_spec("plncmm/spanish-alpaca") == HubSpec("plncmm/spanish-alpaca", None)
    assert parse_hub_spec(r"C:\datos\copia.jsonl") == HubSpec(r"C:\datos\copia.jsonl", None)
    assert parse_hub_spec(r"C:\datos\copia.jsonl:20").limit == 20
    for bad in ("copia.jsonl:0", "copia.jsonl:-3"):
        with pytest.raises(UserError, match="mayor que cero"):
            parse_hub_spec(bad)


def test_bertin_shaped_jsonl_skips_invalid_rows_with_notice():
    hub = load_hub_entries(HubSpec(str(BERTIN)))
    assert hub.available == 8 and hub.invalid == 1 and len(hub.entries) == 7
    assert hub.entries[1]["input"].startswith("Las vacunas entrenan")
    assert any("se omite 1 fila no válida" in n and "fila 6, campo «output»: está vacío" in n for n in hub.notices)


def test_plncmm_shaped_json_ignores_text_column():
    hub = load_hub_entries(HubSpec(str(PLNCMM)))
    assert len(hub.entries) == 5 and set(hub.entries[0]) == {"instruction", "input", "output"}
    expected = f"«{PLNCMM}»: se ignoran los campos no reconocidos: «text» (5 entradas)."
    assert expected in hub.notices


def test_saillab_shaped_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "alpaca-spanish-cleaned.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(SAILLAB)), path)
    hub = load_hub_entries(parse_hub_spec(str(path)))
    assert [e["instruction"] for e in hub.entries] == [r["instruction"] for r in _rows(SAILLAB)]
    assert hub.entries[3]["input"] == "Los hongos son plantas porque no se mueven."


def test_save_to_disk_folder(tmp_path):
    import datasets

    folder = tmp_path / "copia_hub"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(SAILLAB))}).save_to_disk(str(folder))
    hub = load_hub_entries(HubSpec(str(folder)))
    assert len(hub.entries) == 4 and hub.entries[0]["output"].startswith("Los estomas")


def test_alias_columns_csv():
    hub = load_hub_entries(HubSpec(str(ALIASES)))
    assert hub.notices == []  # the alias columns are used, not "ignored"
    assert hub.entries[0] == {
        "instruction": "¿Qué es la meiosis?",
        "input": "",
        "output": (
            "La meiosis es una división celular que produce cuatro células haploides, base de la reproducción sexual."
        ),
    }
    assert hub.entries[2]["input"] == "Las plaquetas intervienen en..."


def test_limit_takes_first_n_after_seeded_shuffle():
    spec = parse_hub_spec(f"{BERTIN}:3")
    first = load_hub_entries(spec, seed=1).entries
    assert len(first) == 3 and first == load_hub_entries(spec, seed=1).entries
    others = [load_hub_entries(spec, seed=s).entries for s in range(2, 8)]
    assert any(o != first for o in others)
    every = load_hub_entries(HubSpec(str(BERTIN))).entries
    assert all(e in every for e in first)


def test_offline_known_name_explains_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        load_hub_entries(parse_hub_spec("bertin-project/alpaca-spanish:100"))
    message = str(info.value)
    assert time.monotonic() - start < 20
    assert "«bertin-project/alpaca-spanish»" in message and "HF_HUB_OFFLINE" in message
    assert "load_dataset('bertin-project/alpaca-spanish'" in message and "--hub-dataset alpaca-spanish.jsonl" in message


def test_offline_from_process_start_goes_through_datasets(tmp_path):
    """HF_HUB_OFFLINE set before start, as a user does: datasets looks in its cache, finds nothing."""
    import os
    import subprocess

    code = (
        "from afinar.core.errors import UserError\n"
        "from afinar.data.hub_datasets import load_hub_entries, parse_hub_spec\n"
        "try:\n"
        "    load_hub_entries(parse_hub_spec('saillab/alpaca-spanish-cleaned:50'))\n"
        "except UserError as err:\n"
        "    print(err)\n"
        "    raise SystemExit(2)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no hay copia en la caché" in done.stdout and "--hub-dataset alpaca-spanish-cleaned.jsonl" in done.stdout


def test_unreachable_hub_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.monotonic()
    with pytest.raises(UserError, match="no hay conexión de red"):
        load_hub_entries(HubSpec("plncmm/spanish-alpaca"))
    assert time.monotonic() - start < 10


def test_unknown_name_and_missing_file():
    with pytest.raises(UserError) as info:
        load_hub_entries(HubSpec("alguien/conjunto-desconocido"))
    assert all(name in str(info.value) for name in KNOWN_HUB_SETS)
    with pytest.raises(UserError, match="No existe el conjunto local"):
        load_hub_entries(HubSpec("no_existe.jsonl"))


def test_prepare_mixes_hub_at_ratio_and_cleans_it(tmp_path):
    local = synthetic_entries(40, seed=21)
    bertin = _rows(BERTIN)
    local.append({"instruction": bertin[0]["instruction"], "output": bertin[0]["output"]})  # also in the Hub copy
    path = tmp_path / "curso.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in local), encoding="utf-8")
    prepared = data.prepare(
        path, hub_specs=[str(BERTIN), str(PLNCMM), str(SAILLAB), f"{ALIASES}:3"], hub_ratio=0.3, seed=5
    )
    summary = prepared.summary
    assert summary["cleaning"]["exact_duplicates"] == 1  # the Hub copy of the local entry, dropped
    assert any("«" in item and "repite entrada 41" in item for item in summary["cleaning"]["duplicate_examples"])
    local_keys = {(r["instruction"], r["output"]) for r in local}
    assert all((e["instruction"], e["output"]) in local_keys for e in prepared.eval)  # eval: local data only
    hub_in_train = [e for e in prepared.train if (e["instruction"], e["output"]) not in local_keys]
    n_local_train = len(prepared.train) - len(hub_in_train)
    assert n_local_train == 41 - len(prepared.eval)
    assert len(hub_in_train) == round(0.3 / 0.7 * n_local_train) == sum(h["used"] for h in summary["hub"])
    assert summary["hub_share"] == pytest.approx(0.3, abs=0.02)
    assert [h["loaded"] for h in summary["hub"]] == [7, 5, 4, 3]
