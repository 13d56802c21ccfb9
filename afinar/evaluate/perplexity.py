"""Held-out perplexity on response tokens, the number that says whether training helped on unseen data.

Stage 02 scores the base model and stage 04 the tuned one on the same entries and the same tokens
(`afinar.core.prompts.tokenize_example`: loss on the response only, closing EOS included).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from afinar.core.errors import UserError
from afinar.core.models import model_device
from afinar.core.prompts import ensure_pad_token, tokenize_example
from afinar.evaluate.logprobs import packed_logps, right_padded, sequence_logps


def perplexity(model, tokenizer, entries: Sequence[dict[str, Any]], **options) -> float:
    """exp(token-weighted mean negative log-likelihood of the response tokens); options as in response_nll.

    Token-weighted (not a mean of per-entry perplexities), so long and short answers count per token and the
    result does not depend on how the entries are batched. Raises UserError for malformed entries (naming
    `source`, the entry number and the field) or when there is nothing to score.
    """
    total_nll, total_tokens = response_nll(model, tokenizer, entries, **options)
    return math.exp(total_nll / total_tokens)


def response_nll(
    model,
    tokenizer,
    entries: Sequence[dict[str, Any]],
    *,
    max_seq_length: int,
    batch_size: int = 8,
    source: str = "el conjunto de evaluación",
    packed: bool | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of scored tokens) over all entries.

    packed: score packed rows (packed_logps) instead of padded batches; by default on the CPU only.
    """
    import torch

    if batch_size < 1:
        raise UserError(f"El tamaño de lote para la perplejidad debe ser al menos 1 (se pidió {batch_size}).")
    if not entries:
        raise UserError(f"No hay entradas en {source} para medir la perplejidad.")
    ensure_pad_token(tokenizer)
    examples = [_tokenized(tokenizer, entry, number, max_seq_length, source)
                for number, entry in enumerate(entries, start=1)]
    # Batches of similar lengths: the sum does not depend on the order, and a batch padded to its longest row
    # wastes less. On the project's held-out split (essays and short answers mixed) this is 30 % fewer positions.
    examples.sort(key=lambda example: len(example["input_ids"]))
    device = model_device(model)
    total_nll = 0.0
    total_tokens = 0
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            if packed if packed is not None else device.type == "cpu":
                # The CPU packs the entries into rows that hold the system prompt once and no padding (the 4D
                # mask of training's shared prefix): the same sums, ~10 % faster on the held-out split. On a GPU
                # Unsloth's attention may not honour a 4D mask, so there the padded batches stay.
                logps, counts = packed_logps(model, examples, max_row_tokens=max_seq_length,
                                             pad_id=tokenizer.pad_token_id)
                total_nll, total_tokens = -float(logps.sum()), int(counts.sum())
            else:
                for start in range(0, len(examples), batch_size):
                    nll, tokens = _batch_nll(model, examples[start:start + batch_size], tokenizer.pad_token_id,
                                             device)
                    total_nll += nll
                    total_tokens += tokens
    finally:
        if was_training:
            model.train()
    if total_tokens == 0:
        raise UserError(f"Ninguna entrada de {source} tiene tokens de respuesta que puntuar.")
    return total_nll, total_tokens


def _tokenized(tokenizer, entry: Any, number: int, max_seq_length: int, source: str) -> dict[str, list[int]]:
    where = f"{source}, entrada {number}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: debe ser un objeto con 'instruction' y 'output'.")
    for field in ("instruction", "output"):
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{where}, campo '{field}': falta o está vacío.")
    if entry.get("input") is not None and not isinstance(entry["input"], str):
        raise UserError(f"{where}, campo 'input': debe ser un texto.")
    return tokenize_example(tokenizer, entry, max_seq_length)


def _batch_nll(model, examples: list[dict[str, list[int]]], pad_id: int, device) -> tuple[float, int]:
    # Right padding: causal attention never lets a real token see the padding after it, and positions stay 0..n.
    # sequence_logps (the probe's and DPO's scorer) sends only the response positions through the LM head and
    # upcasts only those to fp32: the prompt positions would each cost a vocabulary-wide row for nothing
    # (128k columns with Llama), and a bf16 model's loss must not be rounded before it is summed.
    logps, counts = sequence_logps(model, right_padded(examples, pad_id))
    return -float(logps.double().sum()), int(counts.sum())
