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
