"""The stored frozen prefix (afinar.train.frozen_prefix): the same loss and LoRA gradients as the full forward, on the
real embedded model, for packed SFT batches and for the right-padded pairs of the preference phase."""

from __future__ import annotations

import pytest

ENTRIES = [
    {"instruction": "¿Qué es el estroma?", "output": "Es el líquido que rodea los tilacoides del cloroplasto."},
    {"instruction": "Define la fotólisis del agua.", "output": "La ruptura del agua por la luz en el fotosistema II."},
    {"instruction": "¿Respiran las plantas?", "output": "Sí, de día y de noche, en sus mitocondrias."},
    {"instruction": "¿De dónde sale el oxígeno?", "output": "Del agua que se rompe en el fotosistema II."},
]


@pytest.fixture(scope="module")
def top_lora_model(embedded_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.settings import LORA_TARGET_MODULES

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    total = model.config.num_hidden_layers
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, init_lora_weights=False,
                        task_type="CAUSAL_LM", layers_to_transform=list(range(total - 4, total)))
    return get_peft_model(model, config), AutoTokenizer.from_pretrained(embedded_path)


def _rows(tokenizer):
    from afinar.core.prompts import tokenize_example

    return [tokenize_example(tokenizer, e, 256) for e in ENTRIES]


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b):
    import torch

    assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-6), (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], rtol=1e-4, atol=1e-6), name


def test_first_adapted_layer_is_the_lowest_with_lora(top_lora_model):
    from afinar.train import frozen_prefix

    model, _ = top_lora_model
    assert frozen_prefix.first_adapted_layer(model) == model.config.num_hidden_layers - 4


def test_packed_sft_loss_and_gradients_match_and_rows_are_reused(top_lora_model):
    from afinar.train import frozen_prefix
    from afinar.train.packing import Collator, pack_in_order
    from afinar.train.training import response_only_loss

    model, tokenizer = top_lora_model
    model.train()
    packed = pack_in_order(_rows(tokenizer), 120)
    assert len(packed) >= 2  # rows of different lengths: the shorter is padded
    batch = Collator(tokenizer.pad_token_id)(packed)
    batch.pop("real_tokens")
    lengths = batch.pop("row_lengths")
    plain = _loss_and_grads(model, lambda: response_only_loss(model, batch))
    prefix = frozen_prefix.attach(model)
    try:
        first = _loss_and_grads(model, lambda: response_only_loss(model, batch, row_lengths=lengths))
        assert prefix.misses == len(packed) and prefix.hits == 0
        second = _loss_and_grads(model, lambda: response_only_loss(model, batch, row_lengths=lengths))
        assert prefix.hits == len(packed)  # the second epoch runs only the adapted layers
        # The same rows in another batch with other padding (one row alone, unpadded) are found too.
        alone = Collator(tokenizer.pad_token_id)(packed[-1:])
        alone.pop("real_tokens")
        response_only_loss(model, alone, row_lengths=alone.pop("row_lengths")).detach()
        assert prefix.hits == len(packed) + 1 and prefix.misses == len(packed)
    finally:
        frozen_prefix.detach(model)
    _assert_same(plain, first)
    _assert_same(plain, second)


def test_preference_logps_match_with_right_padding(top_lora_model):
    from afinar.train import frozen_prefix
    from afinar.evaluate.logprobs import right_padded, sequence_logps

    model, tokenizer = top_lora_model
    batch = right_padded(_rows(tokenizer), tokenizer.pad_token_id)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1
    plain = _loss_and_grads(model, lambda: sequence_logps(model, batch)[0].sum())
    prefix = frozen_prefix.attach(model)
    try:
        cached = [_loss_and_grads(model, lambda: sequence_logps(model, batch)[0].sum()) for _ in range(2)]
        assert prefix.hits == len(ENTRIES) and prefix.misses == len(ENTRIES)
    finally:
        frozen_prefix.detach(model)
    for result in cached:
        _assert_same(plain, result)


def test_no_prefix_when_every_layer_is_adapted(embedded_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from afinar.train import frozen_prefix

    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert frozen_prefix.first_adapted_layer(model) == 0 and frozen_prefix.attach(model) is None


def test_stage_03_stores_the_prefix_with_top_layer_lora(tmp_path):
    """The real scripts: 02 --lora-layers 4, then 03 for two epochs with DPO; the second epoch and the preference
    phase find their rows stored, and the adapter has weights in the top 4 layers only."""
    import json

    from safetensors.torch import load_file

    from conftest import ROOT, SMALL_QUESTIONS, run_script

    data = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    entries = [e for e in data if "rejected" not in e][:6] + [e for e in data if "rejected" in e][:2]
    (tmp_path / "datos.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "preguntas.json").write_text(json.dumps(SMALL_QUESTIONS[:2], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "salida"
    run_script("02_load_model.py", "--output-dir", str(out), "--questions", str(tmp_path / "preguntas.json"),
               "--max-new-tokens", "4", "--precision", "fp32", "--lora-layers", "4")
    proc = run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(tmp_path / "datos.json"),
                      "--epochs", "2", "--batch-size", "2", "--max-seq-length", "128", "--eval-fraction", "0",
                      "--preference", "dpo", "--preference-epochs", "1")
    assert "se calculan una vez por fila" in proc.stdout
    metrics = json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"]["train"]["metrics"]
    stored = metrics["frozen_prefix"]
    assert stored["start_layer"] == 26 and stored["rows_stored"] > 0
    # Epoch 2 and the DPO phase's scoring and steps revisit rows: at least as many hits as first visits.
    assert stored["hits"] >= stored["misses"] > 0
    assert metrics["preference"]["mode"] == "dpo"
    layers = {int(name.split(".layers.")[1].split(".")[0])
              for name in load_file(str(out / "adapter" / "adapter_model.safetensors"))}
    assert layers == {26, 27, 28, 29}
