"""Order-preserving packing and the collator that feeds the trainer.

TRL's own packing (best-fit decreasing) reorders examples, which would undo the long/short interleaving
that afinar.data.pipeline builds. Here consecutive examples fill a row until the next one would not fit, so the
stream order survives. Packed rows carry position_ids that restart at 0 for each example and no
attention mask: transformers then builds a block-diagonal causal mask, so examples never see each other.

With a shared prefix (the CPU plan), the tokens every example starts with (the chat template's system prompt
and user header: 51 of the ~238 tokens of an average tu_dataset.json example) are kept once per row, not once
per example. Later examples of the row keep their positions (they start at S, right after the prefix) and a
4D mask lets each of them see the row's prefix and itself, so every token sees exactly the keys it would see
alone and the prefix gets the sum of the gradients its copies would get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from afinar.core.prompts import IGNORE_INDEX


def pack_in_order(rows: list[dict], max_seq_length: int, open_rows: int = 1,
                  shared_prefix: Sequence[int] = ()) -> list[dict]:
    """Pack consecutive examples into rows of at most max_seq_length tokens.

    open_rows=1: each example goes into the current row or starts the next one (strict order). With
    open_rows=K, an example may also fill the gap left in one of the K most recent rows (first fit), so an
    example moves at most K rows earlier: the long/short mix survives at the scale of K rows, and rows are
    ~97% full instead of ~88% on Alpaca-like lengths (bench/bench_gpu_train.py data).
    shared_prefix (from common_prefix): an example that starts with these tokens, joining a row of such examples,
    drops them, as the row already has them; the rows then carry segment_ids (which example of the row each token
    belongs to) and example_tokens (the examples' own lengths, prefix included) for the Collator. An example that
    does not start with them (its prompt was cut to fit) gets a row of its own.
    """
    size = len(shared_prefix)
    paired = bool(size) and any(row.get("rejected_ids") for row in rows)
    packed: list[dict] = []
    open_: list[tuple[dict, bool]] = []  # (row, whether later examples may join it)
    for row in rows:
        n = len(row["input_ids"])
        shares = bool(size) and _starts_with(row, shared_prefix)
        joins = shares or not size  # without the prefix, an example neither joins nor is joined
        rejected = list(row.get("rejected_ids") or []) if shares and paired else []
        if n + 1 + len(rejected) > max_seq_length:  # no row could hold both answers: this one trains as plain SFT
            rejected = []
        branch = 1 + len(rejected) if rejected else 0  # the rejected answer after the repeated last prompt token
        cost = (n - size if shares else n) + branch
        target = next((r for r, open_to_others in open_ if joins and open_to_others
                       and len(r["input_ids"]) + cost <= max_seq_length), None)
        if target is None:
            target = {"input_ids": [], "labels": [], "position_ids": []}
            if size:
                target.update(segment_ids=[], example_tokens=0)
            if paired:
                target.update(branch_ids=[], pair_ids=[], pairs=0)
            open_.append((target, joins))
            if len(open_) > open_rows:
                packed.append(open_.pop(0)[0])
        skip = size if shares and target["input_ids"] else 0
        if size:
            segment = target["segment_ids"][-1] + 1 if skip else 0
            target["segment_ids"] += [segment] * (n - skip + branch)
            target["example_tokens"] += n + len(rejected)
        target["input_ids"] += row["input_ids"][skip:]
        target["labels"] += row["labels"][skip:]
        target["position_ids"] += list(range(skip, n))
        if paired:
            _add_rejected_branch(target, row, skip, rejected)
    return packed + [r for r, _ in open_]


def _add_rejected_branch(target: dict, row: dict, skip: int, rejected: list[int]) -> None:
    """ORPO's rejected answer, as a branch of its example that shares the prompt (afinar.train.training).

    The chosen example already sits in the row: its prompt but the last token is the trunk (branch 0), and the
    last prompt token plus the chosen answer are branch 1. Branch 2 repeats that last prompt token (same
    position) and then the rejected answer, so every rejected token is predicted from the row index before it,
    as in the plain shift of the loss, and sees the prompt, never the chosen answer. pair_ids: +k on the tokens
    whose next token is chosen answer, -k on those whose next token is rejected answer, 0 elsewhere.
    """
    n = len(row["input_ids"])
    if not rejected:
        target["branch_ids"] += [0] * (n - skip)
        target["pair_ids"] += [0] * (n - skip)
        return
    prompt = first_label(row)
    target["pairs"] += 1
    k = target["pairs"]
    target["branch_ids"] += [0] * (prompt - 1 - skip) + [1] * (n - prompt + 1)
    # The token at t predicts t + 1: the last prompt token and each answer token but the last (EOS).
    target["pair_ids"] += [0] * (prompt - 1 - skip) + [k] * (n - prompt) + [0]
    target["input_ids"] += [row["input_ids"][prompt - 1]] + rejected
    target["labels"] += [IGNORE_INDEX] * (1 + len(rejected))
    target["position_ids"] += list(range(prompt - 1, prompt + len(rejected)))
    target["branch_ids"] += [2] * (1 + len(rejected))
    target["pair_ids"] += [-k] * len(rejected) + [0]


def first_label(row: dict) -> int:
    """Where the response starts: the first labelled token (the row's length when none is)."""
    return next((t for t, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(row["labels"]))


def common_prefix(rows: list[dict], max_seq_length: int) -> list[int]:
    """The leading tokens that every untruncated example has in common, none of them a training target.

    Rows of max_seq_length tokens are left out of the comparison: their prompt may have been cut at the start
    (afinar.core.prompts.tokenize_example), and pack_in_order gives them rows of their own if so. The first token
    after the prefix must not be a target either: in a shared row it would be predicted from the previous
    example's last token instead of from the prefix. Empty with fewer than 2 untruncated examples.
    """
    rows = [r for r in rows if len(r["input_ids"]) < max_seq_length]
    if len(rows) < 2:
        return []
    first = rows[0]["input_ids"]
    limit = min(len(r["input_ids"]) for r in rows) - 1
    length = 0
    while length < limit and all(r["input_ids"][length] == first[length] for r in rows):
        length += 1
    while length and not all(_starts_with(r, first[:length]) for r in rows):
        length -= 1
    return list(first[:length])


def _starts_with(row: dict, prefix: Sequence[int]) -> bool:
    """The row begins with prefix, and neither the prefix nor the token after it is a training target."""
    size = len(prefix)
    return (len(row["input_ids"]) > size and row["input_ids"][:size] == list(prefix)
            and all(label == IGNORE_INDEX for label in row["labels"][:size + 1]))


def shared_prefix_mask(segment_ids, shared_prefix: int, implementation: str, dtype, branch_ids=None):
    """The 4D attention mask of rows packed with a shared prefix: causal, within each example, plus the prefix.

    Padding is segment -1: it sees itself and the prefix, never a real token's keys (and no real token sees it).
    branch_ids (afinar.evaluate.logprobs.packed_logps): within a segment, branch 0 is the part its members share
    and each other branch sees it and itself, not its sibling branches.
    sdpa takes a boolean mask (True = attend); eager attention adds the mask to the scores.
    """
    import torch

    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[None, :] <= index[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if branch_ids is not None:
        same &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    allowed = causal & (same | (index < shared_prefix)[None, None, :])
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


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
            # would wait for the GPU once per step. With a shared prefix, the examples' own tokens (prefix
            # included), so tokens per second still count the data consumed, as without sharing.
            "real_tokens": sum(e.get("example_tokens") or len(e["input_ids"]) for e in examples),
            # Each row's real tokens (a list of ints, popped with real_tokens): afinar.train.frozen_prefix keys
            # its stored rows on them.
            "row_lengths": [len(e["input_ids"]) for e in examples],
        }
        key = "position_ids" if packed else "attention_mask"
        batch[key] = torch.tensor(extra, dtype=torch.long)
        if "segment_ids" in examples[0]:
            # Turned into the 4D mask by the trainer, which knows the model's attention and dtype.
            batch["segment_ids"] = torch.tensor([list(e["segment_ids"]) + [-1] * (longest - len(e["segment_ids"]))
                                                 for e in examples], dtype=torch.long)
        if "branch_ids" in examples[0]:  # ORPO's rejected answers (_add_rejected_branch)
            for key in ("branch_ids", "pair_ids"):
                batch[key] = torch.tensor([list(e[key]) + [0] * (longest - len(e[key])) for e in examples],
                                          dtype=torch.long)
        return batch
