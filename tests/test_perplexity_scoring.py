"""Held-out perplexity scores only the response positions (afinar.evaluate.logprobs.sequence_logps), and that gives the
same number as the textbook computation over the full logits: real embedded model, fp32."""

import math

import pytest

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from afinar.core.embedded import ensure_checkpoint
from afinar.evaluate.logprobs import right_padded
from afinar.evaluate.perplexity import perplexity
from afinar.core.prompts import IGNORE_INDEX, ensure_pad_token, tokenize_example

ENTRIES = [
    {"instruction": "¿Qué es una enzima?", "output": "Una proteína que acelera una reacción química."},
    {"instruction": "¿Qué es el ADN?", "output": "El ácido desoxirribonucleico, que guarda la información genética."},
]


def test_perplexity_equals_full_logits_cross_entropy():
    path = ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ensure_pad_token(tokenizer)
    batch = right_padded([tokenize_example(tokenizer, e, 256) for e in ENTRIES], tokenizer.pad_token_id)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
    expected = math.exp(float(nll) / int(scored.sum()))

    got = perplexity(model, tokenizer, ENTRIES, max_seq_length=256, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    assert model.training is False


PAIRS = [
    ("¿De dónde sale el oxígeno de la fotosíntesis?", "El oxígeno procede del agua.", "El oxígeno procede del CO2."),
    ("¿Respiran las plantas?", "Sí, de día y de noche.", "No, solo hacen la fotosíntesis."),
    ("¿Dónde ocurre el ciclo de Calvin?", "En el estroma del cloroplasto.", "En los tilacoides, con luz directa."),
]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_score_like_padded_batches(attention):
    """packed_logps (04's perplexity and probe on CPU) keeps the system prompt once per row and each pair's
    question once: the same summed log-probabilities as scoring every row alone, with fewer positions."""
    from afinar.evaluate.logprobs import _common_head, _pack_groups, packed_logps, sequence_logps

    path = ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()
    ensure_pad_token(tokenizer)
    rows = [tokenize_example(tokenizer, e, 256) for e in ENTRIES]
    rows += [tokenize_example(tokenizer, {"instruction": q, "output": s}, 256) for q, *both in PAIRS for s in both]
    groups = [(2 + 2 * i, 3 + 2 * i) for i in range(len(PAIRS))]
    with torch.inference_mode():
        expected, expected_counts = sequence_logps(model, right_padded(rows, tokenizer.pad_token_id))
        # Rows of at most 160 tokens: several packed rows, of unequal lengths, two per forward (so padded too).
        got, counts = packed_logps(model, rows, groups, max_row_tokens=160, rows_per_forward=2,
                                   pad_id=tokenizer.pad_token_id)
    assert counts.tolist() == expected_counts.tolist()
    assert got.tolist() == pytest.approx(expected.double().tolist(), abs=2e-3)
    packed = _pack_groups(rows, [list(g) for g in groups] + [[0], [1]], _common_head(rows), 160)
    assert len(packed) > 1
    assert sum(len(r["input_ids"]) for r in packed) < 0.6 * sum(len(r["input_ids"]) for r in rows)
