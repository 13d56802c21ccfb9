"""Data-parallel training: 03 under torchrun (2 CPU processes, gloo) against one process with double accumulation.

Tolerance: both runs see the same examples in every optimizer step (rank r takes batches r, r+2, ...; one
process with accumulation 2 takes batches 2k and 2k+1), and transformers normalises the loss by the tokens
of all ranks, so in fp32 the results must agree to rounding: losses within 1e-4 (metrics.jsonl keeps 5
decimals), gradient norms within a relative 1e-4, LoRA weights within rtol 1e-3 / atol 1e-5 (the updates
themselves are ~1e-3). Measured on a 2-core CPU machine: identical to the last bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from afinar.core.layout import OutputLayout
from conftest import ROOT, copy_output, run_script

STEPS = 3
# --preference none: these tests compare the SFT phase under DDP; the DPO phase after it runs the same on
# every rank (tests/test_misconceptions.py covers it) and would only double the time. Rows of 128 tokens: the
# comparison holds at any length (both runs see the same rows in every step), and each step costs half of 256.
TRAIN_FLAGS = ("--max-steps", str(STEPS), "--batch-size", "1", "--max-seq-length", "128", "--eval-fraction", "0",
               "--logging-steps", "1", "--save-steps", "2", "--preference", "none")
# One thread per rank: the machine has 2 cores, and both runs then reduce in the same order.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _torchrun(*args: str):
    return run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "03_train_model.py",
                      *args, env=ONE_THREAD)


def _metrics(out: Path) -> list[dict]:
    text = OutputLayout.at(out).metrics.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _train_record(out: Path) -> dict:
    return json.loads(OutputLayout.at(out).manifest.read_text(encoding="utf-8"))["stages"]["train"]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_adapter(got: dict, expected: dict) -> None:
    import torch

    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-3, atol=1e-5), name


# ----------------------------------------------------------------------------------------- launcher env vars


def test_rank_helpers_read_the_launcher_variables(monkeypatch):
    from afinar.core import distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert not distributed.is_distributed()
    distributed.barrier()  # a single process has no one to wait for
    assert distributed.sum_across_ranks(7) == 7

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (distributed.rank(), distributed.local_rank(), distributed.world_size()) == (3, 1, 4)
    assert distributed.is_distributed() and not distributed.is_main_process()


def test_unsloth_backend_is_refused_under_several_processes(monkeypatch):
    from afinar.core.errors import UserError
    from afinar.stages.stage_train import _refuse_unsloth_across_processes

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--backend hf"):
        _refuse_unsloth_across_processes("unsloth")
    _refuse_unsloth_across_processes("hf")
    monkeypatch.setenv("WORLD_SIZE", "1")
    _refuse_unsloth_across_processes("unsloth")


def test_orpo_is_refused_under_several_processes(monkeypatch):
    """Under DDP the wrapped model runs the Trainer's own loss, without ORPO's term: 03 stops at step 3."""
    from afinar.core.environment import DeviceInfo
    from afinar.core.errors import UserError
    from afinar.stages.stage_train import _check_engine

    cpu = DeviceInfo(kind="cpu", name="x86", bf16=False, memory_gib=None, capability=None, colab=False)
    settings = {"backend": "hf", "max_seq_length": 640, "batch_size": 1, "packing": True, "preference": "orpo"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--preference orpo funciona con un solo proceso"):
        _check_engine(settings, cpu)
    _check_engine({**settings, "preference": "dpo"}, cpu)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _check_engine(settings, cpu)


# ----------------------------------------------------------------------------------------- real training


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """The first 12 entries of tu_dataset.json, plenty for 3 steps of 2 rows: every process of these runs (each
    rank, the single run, the resumed ranks) prepares 12 entries instead of the whole file."""
    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))[:12]
    path = tmp_path_factory.mktemp("datos") / "pocos.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_runs(stage02_dir, small_dataset, tmp_path_factory):
    """The same 3 steps, trained by 2 processes x accumulation 1 and by 1 process x accumulation 2."""
    work = tmp_path_factory.mktemp("ddp")
    ddp = copy_output(stage02_dir, work / "dos_procesos")
    single = copy_output(stage02_dir, work / "un_proceso")
    data = ("--dataset", str(small_dataset))
    ddp_proc = _torchrun("--output-dir", str(ddp), "--grad-accum", "1", *data, *TRAIN_FLAGS)
    run_script("03_train_model.py", "--output-dir", str(single), "--grad-accum", "2", *data, *TRAIN_FLAGS,
               env=ONE_THREAD)
    return ddp, single, ddp_proc


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_double_accumulation(two_runs):
    ddp, single, proc = two_runs
    ddp_rows, single_rows = _metrics(ddp), _metrics(single)
    assert [r["step"] for r in ddp_rows] == list(range(1, STEPS + 1))  # rank 1 logged nothing
    for got, expected in zip(ddp_rows, single_rows, strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], abs=1e-4)
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)

    initial = _adapter(OutputLayout.at(single).initial_adapter)
    trained = _adapter(OutputLayout.at(single).adapter)
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 1e-4  # the steps did move it
    _assert_same_adapter(_adapter(OutputLayout.at(ddp).adapter), trained)

    ddp_record, single_record = _train_record(ddp), _train_record(single)
    assert (ddp_record["world_size"], single_record["world_size"]) == (2, 1)
    # Each rank counted its own share of tokens; summed, they are exactly the tokens of the single run.
    assert ddp_record["metrics"]["real_tokens"] == single_record["metrics"]["real_tokens"]
    assert ddp_record["metrics"]["global_step"] == STEPS

    # Rank 1's stdout is silenced: every line once.
    assert proc.stdout.count("heredado de run.json: seed") == 1
    assert proc.stdout.count("step=1 ") == 1
    assert proc.stdout.count("Listo. Adaptador") == 1
    checkpoint = OutputLayout.at(ddp).checkpoints / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_resume_under_two_processes_reproduces_the_uninterrupted_run(two_runs, small_dataset, tmp_path):
    ddp, single, _ = two_runs
    out = copy_output(ddp, tmp_path / "reanudado")
    layout = OutputLayout.at(out)
    # As if the run had died after step 2: only checkpoint-2 survives, no adapter was saved.
    shutil.rmtree(layout.checkpoints / f"checkpoint-{STEPS}")
    shutil.rmtree(layout.adapter)

    proc = _torchrun("--output-dir", str(out), "--grad-accum", "1", "--dataset", str(small_dataset), *TRAIN_FLAGS,
                     "--resume")
    assert proc.stdout.count("Reanudando desde") == 1 and "checkpoint-2" in proc.stdout
    record = _train_record(out)
    assert record["world_size"] == 2 and record["metrics"]["resumed_from"] == "checkpoints/checkpoint-2"
    assert [r["step"] for r in _metrics(out)] == list(range(1, STEPS + 1))
    _assert_same_adapter(_adapter(layout.adapter), _adapter(OutputLayout.at(single).adapter))
