"""Preference training after SFT: the corrected fact must win over the old error, not just be likely.

SFT raises the probability of the right answer but leaves the misconception almost as likely: after the
default CPU demo the base model's error still won on about half of the held-out probe pairs (issue 24). DPO
(Rafailov et al., 2023) trains on (question, correct answer, the misconception) triples and pushes exactly
that difference: the log-ratio of the correct answer over the error, measured against a frozen reference.
Here the reference is the SFT model itself, whose log-probabilities are computed once before the phase, so no
second copy of the model is needed. A small SFT term on the correct answer (as in RPO, Pang et al., 2024)
keeps DPO from lowering both answers at once, which would cost fluency and perplexity.

Triples come from the dataset: any entry with a `rejected` field (afinar.data.data_check) takes part.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

from afinar.core.errors import UserError
from afinar.core.prompts import tokenize_example
from afinar.evaluate.logprobs import right_padded, sequence_logps

MODES = ("auto", "dpo", "none")


def triples(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training entries that carry a misconception to train against."""
    return [e for e in entries if isinstance(e.get("rejected"), str) and e["rejected"].strip()]


def tokenized_pairs(tokenizer, entries: Sequence[dict[str, Any]], max_seq_length: int) -> list[tuple[dict, dict]]:
    pairs = []
    for entry in entries:
        chosen = tokenize_example(tokenizer, entry, max_seq_length)
        rejected = tokenize_example(tokenizer, {**entry, "output": entry["rejected"]}, max_seq_length)
        pairs.append((chosen, rejected))
    return pairs


def train_preference(model, tokenizer, entries: Sequence[dict[str, Any]], *, max_seq_length: int, beta: float,
                     epochs: float, learning_rate: float, batch_size: int, sft_weight: float, seed: int,
                     precision: str = "fp32", max_steps: int | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """DPO (+ SFT on the chosen answer) over the LoRA parameters; returns the metrics for run.json.

    max_steps (03's --max-steps, for quick runs) caps this phase's steps as it caps the SFT's.
    """
    import torch
    import torch.nn.functional as F

    if not (beta > 0 and math.isfinite(beta)):
        raise UserError(f"--dpo-beta debe ser un número positivo (se pidió {beta}).")
    if not (epochs > 0 and math.isfinite(epochs)):
        raise UserError(f"--preference-epochs debe ser mayor que 0 (se pidió {epochs}).")
    pairs = tokenized_pairs(tokenizer, triples(entries), max_seq_length)
    if not pairs:
        return {"mode": "none", "pairs": 0}
    pad = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    autocast = _autocast(device, precision)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "fp16" else None

    def batch_of(indices: Sequence[int]):
        chunk = [pairs[i] for i in indices]
        # One forward for both sides: chosen rows first, rejected rows after.
        return right_padded([c for c, _ in chunk] + [r for _, r in chunk], pad)

    def batches(indices: Sequence[int]):
        for start in range(0, len(indices), batch_size):
            yield list(indices[start:start + batch_size]), batch_of(indices[start:start + batch_size])

    # The whole schedule first: a shuffled order per epoch, cut into batches, as many steps as planned. A short
    # run (--max-steps) then scores only the pairs it will visit.
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    if max_steps:
        total_steps = min(total_steps, max_steps)
    schedule_idx: list[list[int]] = []
    while len(schedule_idx) < total_steps:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        schedule_idx += [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    schedule_idx = schedule_idx[:total_steps]
    visited = sorted({i for chunk in schedule_idx for i in chunk})

    started = time.perf_counter()
    model.eval()
    reference = torch.zeros(len(pairs), 2, dtype=torch.float32)
    with torch.no_grad(), autocast:
        for idx, batch in batches(visited):
            logps, _ = sequence_logps(model, batch)
            n = len(idx)
            reference[idx, 0] = logps[:n].float().cpu()
            reference[idx, 1] = logps[n:].float().cpu()
    start_accuracy = float((reference[visited, 0] > reference[visited, 1]).float().mean())

    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    # A short warm-up then a linear decay to zero, as in the SFT phase.
    warmup = max(1, round(0.1 * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    model.train()
    step, rows = 0, []
    for idx in schedule_idx:
        batch = batch_of(idx)
        with autocast:
            logps, counts = sequence_logps(model, batch)
        n = len(idx)
        chosen, rejected = logps[:n].float(), logps[n:].float()
        ref = reference[idx].to(device)
        margin = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        dpo = -F.logsigmoid(beta * margin).mean()
        sft = -(chosen / counts[:n].clamp(min=1)).mean()
        loss = dpo + sft_weight * sft
        if not torch.isfinite(loss):
            raise UserError(f"La pérdida de preferencias dejó de ser finita en el paso {step + 1}: baja "
                            f"--preference-learning-rate.")
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step += 1
        rows.append({"step": step, "loss": float(loss.detach()), "dpo": float(dpo.detach()),
                     "sft": float(sft.detach()), "accuracy": float((margin.detach() > 0).float().mean())})
        if step % max(1, steps_per_epoch) == 0 or step == total_steps:
            recent = rows[-steps_per_epoch:]
            log(f"preference_step={step}/{total_steps} dpo={_mean(r['dpo'] for r in recent):.4f} "
                f"sft={_mean(r['sft'] for r in recent):.4f} "
                f"accuracy={_mean(r['accuracy'] for r in recent):.2f}")
    model.eval()
    with torch.no_grad(), autocast:
        wins = 0
        for idx, batch in batches(visited):
            logps, _ = sequence_logps(model, batch)
            n = len(idx)
            wins += int((logps[:n] > logps[n:]).sum())
    return {
        "mode": "dpo", "pairs": len(pairs), "steps": total_steps, "beta": beta, "epochs": epochs,
        "learning_rate": learning_rate, "batch_size": batch_size, "sft_weight": sft_weight,
        "train_pairs_correct_before": round(start_accuracy, 4), "train_pairs_correct_after": round(wins / len(visited), 4),
        "final_dpo_loss": round(rows[-1]["dpo"], 5), "seconds": round(time.perf_counter() - started, 1),
    }


def _autocast(device, precision: str):
    import torch

    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
