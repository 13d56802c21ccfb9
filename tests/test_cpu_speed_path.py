"""The CPU training path's speed choices change no trained number (speed: bench/bench_cpu_train.py)."""

from __future__ import annotations

import json

import pytest


def _tiny_lora_model(tokenizer, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from afinar.train import modeling

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).to(dtype)
    return modeling.add_lora(base, backend="hf", lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    from afinar.core.prompts import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tok)
    return tok


def _train(model, tokenizer, tmp_path, precision: str, steps: int = 2) -> list[float]:
    from afinar.train import training
    from afinar.core.layout import OutputLayout

    entries = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:24]
    settings = {"max_seq_length": 256, "learning_rate": 1e-3, "epochs": 1, "max_steps": steps, "batch_size": 2,
                "grad_accum": 1, "seed": 0, "warmup_ratio": 0.0, "save_steps": 10**6, "save_minutes": 10**6,
                "logging_steps": 1}
    layout = OutputLayout.at(tmp_path)
    training.train(model, tokenizer, entries, layout=layout, settings=settings, precision=precision, packing=True)
    return [json.loads(line)["loss"] for line in layout.metrics.read_text().splitlines()]


def test_cpu_training_does_not_checkpoint_gradients(tokenizer, tmp_path):
    """TRL's SFTConfig checkpoints gradients by default, which recomputes every layer in the backward; on CPU
    the engine plan never asks for it, and the Trainer must not turn it on behind the plan's back."""
    import torch

    from afinar.train import engine
    from afinar.core.environment import DeviceInfo

    cpu = DeviceInfo(kind="cpu", name="cpu", bf16=False, memory_gib=None, capability=None, colab=False)
    assert engine.plan({"batch_size": 4, "packing": True}, cpu).gradient_checkpointing is False
    model = _tiny_lora_model(tokenizer, torch.float32)
    losses = _train(model, tokenizer, tmp_path, "fp32", steps=2)
    assert len(losses) == 2
    assert not model.get_base_model().is_gradient_checkpointing


def test_speed_path_changes_no_trained_number(tokenizer, tmp_path, monkeypatch):
    """Without gradient checkpointing (the CPU path, ~35 % faster) the same steps give the same losses and the
    same LoRA weights as with it (TRL's default): checkpointing only recomputes activations, bit for bit."""
    import torch

    from afinar.train import training

    plain = _tiny_lora_model(tokenizer, torch.float32)
    plain_losses = _train(plain, tokenizer, tmp_path / "rapida", "fp32", steps=3)
    monkeypatch.setattr(training, "_checkpointing_config", lambda _: {"gradient_checkpointing": True})
    checkpointed = _tiny_lora_model(tokenizer, torch.float32)
    checkpointed_losses = _train(checkpointed, tokenizer, tmp_path / "con_checkpointing", "fp32", steps=3)

    assert checkpointed.get_base_model().is_gradient_checkpointing  # the reference really recomputed
    assert not plain.get_base_model().is_gradient_checkpointing
    assert len(plain_losses) == 3
    assert plain_losses == pytest.approx(checkpointed_losses, rel=1e-5, abs=1e-6)
    weights = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    reference = dict(checkpointed.named_parameters())
    assert weights
    for name, value in weights.items():
        assert torch.allclose(value, reference[name], rtol=1e-5, atol=1e-7), name
