"""Order-preserving packing and the collator that feeds the trainer.

TRL's own packing (best-fit decreasing) reorders examples, which would undo the long/short interleaving
that afinar.data.pipeline builds. Here consecutive examples fill a row until the next one would not fit, so the
stream order survives. Packed rows carry position_ids that restart at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask, so examples never see each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from afinar.core.prompts import IGNORE_INDEX


def pack_in_order(rows: list[dict], max_seq_length: int, open_rows: int = 1) -> list[dict]:
    """Pack consecutive examples into rows of at most max_seq_length tokens.

    open_rows=1: each example goes into the current row or starts the next one (strict order). With
    open_rows=K, an example may also fill the gap left in one of the K most recent rows (first fit), so an
    example moves at most K rows earlier: the long/short mix survives at the scale of K rows, and rows are
    ~97% full instead of ~88% on Alpaca-like lengths (bench/bench_gpu_train.py data).
    """
    packed: list[dict] = []
    open_: list[dict] = []
    for row in rows:
        n = len(row["input_ids"])
        target = next((r for r in open_ if len(r["input_ids"]) + n <= max_seq_length), None)
        if target is None:
            target = {"input_ids": [], "labels": [], "position_ids": []}
            open_.append(target)
            if len(open_) > open_rows:
                packed.append(open_.pop(0))
        target["input_ids"] += row["input_ids"]
        target["labels"] += row["labels"]
        target["position_ids"] += list(range(n))
    return packed + open_


@dataclass
class Collator:
    """Right-pads a batch; `real_tokens` (non-pad tokens) is popped by the trainer before the forward."""

    pad_token_id: int
    pad_to: int | None = None  # fixed row length (compiled layers); None = the longest row of the batch
    rows: int | None = None  # fixed rows per batch: a short last batch gets empty rows (no labels)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to:
            longest = max(longest, self.pad_to)
        if self.rows and len(examples) < self.rows:
            empty = {key: [] for key in examples[0]}
            examples = list(examples) + [empty] * (self.rows - len(examples))
        packed = "position_ids" in examples[0]
        input_ids, labels, extra = [], [], []
        for e in examples:
            gap = longest - len(e["input_ids"])
            input_ids.append(list(e["input_ids"]) + [self.pad_token_id] * gap)
            labels.append(list(e["labels"]) + [IGNORE_INDEX] * gap)
            if packed:
                # Padding gets positions 0,1,2... of its own: a separate "document" no real token attends to.
                extra.append(list(e["position_ids"]) + list(range(gap)))
            else:
                extra.append([1] * len(e["input_ids"]) + [0] * gap)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            # A Python int, not a tensor: the trainer would move a tensor to the GPU and reading it back
            # would wait for the GPU once per step.
            "real_tokens": sum(len(e["input_ids"]) for e in examples),
            # Each row's real tokens (a list of ints, popped with real_tokens): afinar.train.frozen_prefix keys
            # its stored rows on them.
            "row_lengths": [len(e["input_ids"]) for e in examples],
        }
        key = "position_ids" if packed else "attention_mask"
        batch[key] = torch.tensor(extra, dtype=torch.long)
        return batch
