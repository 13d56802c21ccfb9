"""Summed log-probabilities of the labelled (response) tokens of each row: what the misconception probe
compares and what preference training (afinar.train.preference) optimises.

Rows are tokenized with `afinar.core.prompts.tokenize_example`, so a statement is scored exactly as the model
would produce it as an answer: after the system prompt, the question and the assistant header.
"""

from __future__ import annotations

from typing import Any, Sequence

from afinar.core.models import model_device, unwrap_peft
from afinar.core.prompts import IGNORE_INDEX
from afinar.train import frozen_prefix


def right_padded(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """input_ids / attention_mask / labels tensors, padded on the right (positions stay 0..n-1 per row)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sequence_logps(model, batch: dict[str, Any]):
    """(summed log p of each row's labelled tokens, number of labelled tokens per row), as tensors.

    Only the labelled positions go through the LM head (as in afinar.train.training.response_only_loss): the
    prompt positions would cost a vocabulary-wide row each for nothing. Differentiable when grad is on.
    """
    import torch

    causal_lm = unwrap_peft(model)
    device = model_device(causal_lm)
    features = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    prefix = frozen_prefix.of(causal_lm)  # stage 03's preference phase: the frozen layers once per row
    if prefix is not None:
        hidden = prefix.last_hidden_state(features, batch["attention_mask"].sum(dim=1).tolist())
    else:
        hidden = causal_lm.model(**features).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(targets.shape[0], device=device).unsqueeze(1).expand_as(targets)[keep]
    summed = torch.zeros(targets.shape[0], device=device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return summed, keep.sum(dim=1)
