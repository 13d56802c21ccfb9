"""Order-preserving packing and the collator that feeds the trainer.

TRL's own packing (best-fit decreasing) reorders examples, which would undo the long/short interleaving
that afinar.data builds. Here consecutive examples fill a row until the next one would not fit, so the
stream order survives. Packed rows carry position_ids that restart at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask, so examples never see each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import IGNORE_INDEX


def pack_in_order(rows: list[dict], max_seq_length: int) -> list[dict]:
    packed: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        n = len(row["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_seq_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += row["input_ids"]
        current["labels"] += row["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packed.append(current)
    return packed


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
            "real_tokens": torch.tensor(sum(len(e["input_ids"]) for e in examples)),
        }
        key = "position_ids" if packed else "attention_mask"
        batch[key] = torch.tensor(extra, dtype=torch.long)
        return batch
