"""Issue 14: the CPU demo's choices — bf16 only where the kernels may use it, LoRA on the top layers."""

from __future__ import annotations

import json

from conftest import run_script

from afinar.core.environment import cpu_has_fast_bf16


def test_bf16_detection_obeys_the_isa_caps(tmp_path, monkeypatch):
    amx = tmp_path / "cpuinfo"
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", encoding="utf-8")
    avx2 = tmp_path / "cpuinfo_avx2"
    avx2.write_text("flags\t\t: fpu avx2 fma\n", encoding="utf-8")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_has_fast_bf16(str(amx)) and not cpu_has_fast_bf16(str(avx2))
    # How issue 14 emulates an AVX2-only machine on an AMX one: bf16 would be emulated, so fp32 must win.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not cpu_has_fast_bf16(str(amx))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_fast_bf16(str(amx))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AMX_BF16")
    assert cpu_has_fast_bf16(str(amx))


def test_lora_on_the_top_layers_only(embedded_path):
    import torch
    from transformers import AutoModelForCausalLM

    from afinar.train.modeling import add_lora

    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    total = model.config.num_hidden_layers
    model = add_lora(model, backend="hf", lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0, lora_layers=5)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert layers == set(range(total - 5, total))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    # No trainable weight below the adapted layers: autograd stops at the first adapted layer.
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_layers_out_of_range_fails_before_writing(tmp_path):
    out = tmp_path / "salida"
    proc = run_script("02_load_model.py", "--output-dir", str(out), "--lora-layers", "99", check=False)
    assert proc.returncode == 2
    assert "--lora-layers 99" in proc.stderr and "30 capas" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
