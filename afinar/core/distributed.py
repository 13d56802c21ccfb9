"""Which process am I? Rank and world size for `torchrun` / `accelerate launch`, read from their env vars.

Both launchers set RANK, LOCAL_RANK and WORLD_SIZE for every process; a plain `python` run has none of
them and is rank 0 of a world of 1, so every helper here is a no-op there.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

# Same as TrainingArguments.ddp_timeout: the Trainer reuses the process group we may open first.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    return max(1, _env_int("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0 alone writes run.json, the adapter, the data report, the metrics and prints the log."""
    return rank() == 0


def configure_process() -> None:
    """Call first thing in a script that may run under a launcher; does nothing in a single process."""
    if not is_distributed():
        return
    if not is_main_process():
        # Each line and progress bar once, from rank 0; errors of any rank still reach stderr.
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    import torch

    if not torch.cuda.is_available():
        # accelerate names each CPU rank's device "cpu:0", and the Trainer then resumes with
        # torch.load(map_location="cpu:0"), which torch rejects ("don't know how to restore data location").
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


def _cuda_device():
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


def _process_group():
    """The default process group, opened here if the Trainer has not opened it yet (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    device = _cuda_device()  # before any CUDA work, so that "cuda" means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device is not None else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=device)
    return dist


def barrier() -> None:
    """Wait until every rank gets here (e.g. before reading what rank 0 wrote). No-op in a single process."""
    if is_distributed():
        dist = _process_group()
        dist.barrier()


def sum_across_ranks(value: int) -> int:
    """Sum of an integer over all ranks (e.g. tokens seen). Every rank must call it at the same point."""
    if not is_distributed():
        return int(value)
    import torch

    dist = _process_group()
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())
