"""The CPU training path's speed choices change no trained number beyond bf16 rounding (speed: bench/bench_cpu_train.py)."""

from __future__ import annotations

import json

import pytest


def _tiny_lora_model(tokenizer, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from afinar import modeling

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).to(dtype)
    return modeling.add_lora(base, backend="hf", lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    from afinar.prompts import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tok)
    return tok


def _train(model, tokenizer, tmp_path, precision: str, steps: int = 2) -> list[float]:
    from afinar import training
    from afinar.layout import OutputLayout

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

    from afinar import engine
    from afinar.environment import DeviceInfo

    cpu = DeviceInfo(kind="cpu", name="cpu", bf16=False, memory_gib=None, capability=None, colab=False)
    assert engine.plan({"batch_size": 4, "packing": True}, cpu).gradient_checkpointing is False
    model = _tiny_lora_model(tokenizer, torch.float32)
    losses = _train(model, tokenizer, tmp_path, "fp32", steps=2)
    assert len(losses) == 2
    assert not model.get_base_model().is_gradient_checkpointing


def test_cpu_bf16_training_runs_lora_in_bf16_under_autocast(tokenizer, tmp_path):
    """With a bf16 base on CPU, the LoRA matrices see bf16 inputs (no fp32 copies of the activations) while
    their weights, gradients and optimizer state stay in fp32."""
    import torch

    model = _tiny_lora_model(tokenizer, torch.bfloat16)
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.dtype == torch.float32
    seen = []
    lora_a.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    losses = _train(model, tokenizer, tmp_path, "bf16")
    assert len(losses) == 2 and all(loss == loss and loss < 20 for loss in losses)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, seen
    assert lora_a.weight.dtype == torch.float32
    moved = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    assert moved > 0  # LoRA B starts at zero: the fp32 weights were updated


def test_skipping_the_lora_input_cast_under_autocast_is_exact(tokenizer):
    """PEFT casts each LoRA input to fp32 and autocast casts it back to bf16: skipping both changes no bit
    of the loss or of any gradient. And without autocast (fp32) the helper changes nothing."""
    import torch
    from peft.helpers import disable_input_dtype_casting

    from afinar.packing import Collator
    from afinar.prompts import tokenize_example
    from afinar.training import cpu_bf16_autocast, response_only_loss

    model = _tiny_lora_model(tokenizer, torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a LoRA B of zeros would hide the LoRA path
    entries = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:3]
    batch = Collator(tokenizer.pad_token_id)([tokenize_example(tokenizer, e, 256) for e in entries])
    batch.pop("real_tokens")

    def loss_and_grads(context):
        model.zero_grad()
        with context:
            loss = response_only_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours = loss_and_grads(cpu_bf16_autocast(model, True))
    with disable_input_dtype_casting(model, active=False):
        peft_cast = loss_and_grads(torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.equal(ours[0], peft_cast[0])
    assert all(torch.equal(ours[1][n], peft_cast[1][n]) for n in ours[1])

    plain = loss_and_grads(cpu_bf16_autocast(model, False))
    assert not torch.is_autocast_enabled("cpu")
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules())
    assert torch.allclose(plain[0], ours[0], rtol=2e-2)
