"""The CPU loss path: same value and gradients as the model's own loss, response tokens only."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def peft_model(embedded_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.settings import LORA_TARGET_MODULES

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), AutoTokenizer.from_pretrained(embedded_path)


def _batch(tokenizer, packed: bool):
    from afinar.train.packing import Collator, pack_in_order
    from afinar.core.prompts import tokenize_example

    entries = [
        {"instruction": "¿Qué es el estroma?", "output": "Es el líquido que rodea los tilacoides del cloroplasto."},
        {"instruction": "Define la fotólisis del agua.", "output": "La ruptura del agua por la luz en el fotosistema II."},
        {"instruction": "¿Respiran las plantas?", "output": "Sí, de día y de noche, en sus mitocondrias."},
    ]
    rows = [tokenize_example(tokenizer, e, 256) for e in entries]
    if packed:
        rows = pack_in_order(rows, 160)
    batch = Collator(tokenizer.pad_token_id)(rows)
    batch.pop("real_tokens")
    batch.pop("row_lengths")
    return batch


@pytest.mark.parametrize("packed", [False, True])
def test_response_only_loss_matches_model_loss(peft_model, packed):
    import torch

    from afinar.train.training import response_only_loss

    model, tokenizer = peft_model
    batch = _batch(tokenizer, packed)
    model.zero_grad()
    reference = model(**batch).loss
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ours = response_only_loss(model, batch)
    ours.backward()
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        got = dict(model.named_parameters())[name].grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-7), name


def test_packed_rows_keep_examples_apart(peft_model):
    """A packed row must score each example exactly as if it were alone (block-diagonal attention)."""
    import torch

    from afinar.train.training import response_only_loss

    model, tokenizer = peft_model
    with torch.no_grad():
        packed = response_only_loss(model, _batch(tokenizer, True))
        padded = response_only_loss(model, _batch(tokenizer, False))
    assert torch.allclose(packed, padded, rtol=1e-4)
