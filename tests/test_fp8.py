"""The e4m3 base of the compiled engine (afinar.train.fp8): its products, its swap, its check and who gets it.

torch._scaled_mm runs on CPU too, so the same code that runs on a Hopper GPU is exercised here.
"""

from __future__ import annotations

import json

import pytest

from afinar.train import engine, fp8
from afinar.core.environment import DeviceInfo
from afinar.core.errors import UserError
from conftest import copy_output, run_script
from test_engine import A100_80, CPU, H200, T4, gpu_settings


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_e4m3_products_and_input_gradients_stay_close_to_the_exact_ones():
    import torch
    from torch import nn

    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=True).requires_grad_(False)
    x = torch.randn(3, 40, 256, requires_grad=True)
    exact = linear(x)
    exact.square().sum().backward()
    exact_grad, x.grad = x.grad.clone(), None

    quantized = fp8.Fp8FrozenLinear(linear)
    out = quantized(x)
    out.square().sum().backward()
    assert out.shape == exact.shape
    # e4m3 keeps 3 mantissa bits: a few per cent per product, and truly rounded (not a bf16 product in disguise).
    assert 1e-3 < _relative(out.detach(), exact.detach()) < 0.06
    assert 1e-3 < _relative(x.grad, exact_grad) < 0.08
    assert quantized.weight8.dtype == torch.float8_e4m3fn and quantized.weight8_t.shape == (256, 512)


def _tiny_lora_model(tokenizer, initializer_range: float = 0.02):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from afinar.train import modeling

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         initializer_range=initializer_range)
    return modeling.add_lora(LlamaForCausalLM(config), backend="hf", lora_r=8, lora_alpha=8, lora_dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    from afinar.core.prompts import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tok)
    return tok


def test_swap_covers_every_lora_projection_and_leaves_the_adapter_file_alone(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from afinar.train import modeling

    model = _tiny_lora_model(tokenizer)
    originals = [m.base_layer for m in fp8._lora_layers(model)]
    before = set(model.state_dict())
    assert fp8.use_fp8_base_(model) == 2 * 7  # two layers, the seven projections of the seed
    assert all(isinstance(m.base_layer, fp8.Fp8FrozenLinear) for m in fp8._lora_layers(model))
    # The e4m3 copies are not saved anywhere; only the (frozen) original weights stay reachable.
    assert not any("weight8" in k for k in model.state_dict())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    modeling.save_adapter(model, tokenizer, tmp_path / "adapter", "prueba")
    saved = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert saved and all("lora_" in k and "original" not in k for k in saved)
    assert fp8.use_bf16_base_(model) == 14
    assert [m.base_layer for m in fp8._lora_layers(model)] == originals and set(model.state_dict()) == before


def test_training_on_the_e4m3_base_follows_the_exact_losses(tokenizer, tmp_path):
    from afinar.train import training
    from afinar.core.layout import OutputLayout

    entries = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:30]
    settings = {"max_seq_length": 512, "learning_rate": 1e-3, "epochs": 1, "max_steps": 3, "batch_size": 3,
                "grad_accum": 1, "seed": 0, "warmup_ratio": 0.0, "save_steps": 10**6, "save_minutes": 10**6,
                "logging_steps": 1}

    def run(use_fp8: bool) -> tuple[list[float], float]:
        model = _tiny_lora_model(tokenizer)
        if use_fp8:
            fp8.use_fp8_base_(model)
        layout = OutputLayout.at(tmp_path / ("fp8" if use_fp8 else "exacto"))
        training.train(model, tokenizer, entries, layout=layout, settings=settings, precision="fp32", packing=True)
        moved = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
        return [json.loads(line)["loss"] for line in layout.metrics.read_text().splitlines()], moved

    (exact, exact_moved), (rounded, rounded_moved) = run(False), run(True)
    assert len(exact) == len(rounded) == 3
    assert rounded == pytest.approx(exact, rel=2e-3), (exact, rounded)
    assert rounded_moved > 0 and rounded_moved == pytest.approx(exact_moved, rel=0.05)


def test_the_check_keeps_fp8_when_the_loss_barely_moves_and_drops_it_otherwise(tokenizer, monkeypatch):
    from afinar.stages.stage_train import probe_rows

    entries = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:4]
    rows = probe_rows(entries, tokenizer, 512)

    kept = engine.Plan("compiled", "hf", 4, True, False, fp8_base=True)
    model = _tiny_lora_model(tokenizer)
    engine.prepare_model_(model, kept, rows)
    assert kept.fp8_base and kept.fp8_drift is not None and 0 < kept.fp8_drift < fp8.MAX_LOSS_DRIFT
    assert isinstance(fp8._lora_layers(model)[0].base_layer, fp8.Fp8FrozenLinear)
    # Measuring again leaves the very same quantized modules in place (no second quantization).
    quantized = [layer.base_layer for layer in fp8._lora_layers(model)]
    fp8.loss_drift(model, rows)
    assert [layer.base_layer for layer in fp8._lora_layers(model)] == quantized
    assert "FP8 comprobado en 4 ejemplos" in kept.reasons[-1]

    # A model whose activations e4m3 represents badly: any change counts as too much.
    monkeypatch.setattr(fp8, "MAX_LOSS_DRIFT", 0.0)
    dropped = engine.Plan("compiled", "hf", 4, True, False, fp8_base=True)
    model = _tiny_lora_model(tokenizer)
    engine.prepare_model_(model, dropped, rows)
    assert not dropped.fp8_base and "FP8 descartado" in dropped.reasons[-1]
    assert not any(isinstance(m.base_layer, fp8.Fp8FrozenLinear) for m in fp8._lora_layers(model))


def test_outlier_activation_channels_make_the_check_fall_back_to_bf16(tokenizer):
    """Real LLMs carry a few activation channels 100-1000x larger than the rest, and nothing in the weights
    says beforehand whether e4m3 copes: the check on the user's own rows is what protects them.

    Per-token scales absorb 1000x (e4m3 spans ~2e5 from its largest value to its smallest subnormal), so the
    injected channels go past that range: each token's scale is then set by them and every other channel
    rounds to zero, as do the matching weight columns under per-row scales. The exact function is unchanged.
    """
    import torch

    from afinar.stages.stage_train import probe_rows

    rows = probe_rows(json.loads(open("tu_dataset.json", encoding="utf-8").read())[:4], tokenizer, 512)
    # At the default init (0.02) the random model's loss sits at log(vocab) whatever its layers do (removing
    # them moves it 0.07 %), so no rounding could reach 1 %; at 0.2 the decoder layers carry ~9 % of it.
    scale, factor, channels = 0.2, 1e7, [3, 17, 30]

    kept = engine.Plan("compiled", "hf", 4, True, False, fp8_base=True)
    model = _tiny_lora_model(tokenizer, initializer_range=scale)
    exact = fp8.loss_drift(model, rows)[1]  # no e4m3 layer yet: the original model's loss
    engine.prepare_model_(model, kept, rows)
    assert kept.fp8_base and kept.fp8_drift < fp8.MAX_LOSS_DRIFT, kept.reasons

    model = _tiny_lora_model(tokenizer, initializer_range=scale)
    with torch.no_grad():  # norm weight × factor, the columns that read it ÷ factor: the same function
        for layer in engine.decoder_layers(model):
            attention, mlp = layer.self_attn, layer.mlp
            for norm, projections in ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                                      (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[channels] *= factor
                for projection in projections:
                    projection.base_layer.weight[:, channels] /= factor
    assert fp8.loss_drift(model, rows)[1] == pytest.approx(exact, rel=1e-5)

    dropped = engine.Plan("compiled", "hf", 4, True, False, fp8_base=True)
    engine.prepare_model_(model, dropped, rows)
    assert not dropped.fp8_base and dropped.fp8_drift > fp8.MAX_LOSS_DRIFT, (kept.fp8_drift, dropped.reasons)
    assert "FP8 descartado" in dropped.reasons[-1]
    assert not any(isinstance(m.base_layer, fp8.Fp8FrozenLinear) for m in fp8._lora_layers(model))


def test_a_card_whose_torch_cannot_multiply_in_e4m3_trains_in_bf16(tokenizer, monkeypatch):
    import torch

    from afinar.stages.stage_train import probe_rows

    def unsupported(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration")  # what torch says on a card without row-wise FP8

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    plan = engine.Plan("compiled", "hf", 4, True, False, fp8_base=True)
    model = _tiny_lora_model(tokenizer)
    rows = probe_rows(json.loads(open("tu_dataset.json", encoding="utf-8").read())[:2], tokenizer, 512)
    engine.prepare_model_(model, plan, rows)
    assert not plan.fp8_base and "no pudo multiplicar en e4m3" in plan.reasons[-1]
    assert not any(isinstance(m.base_layer, fp8.Fp8FrozenLinear) for m in fp8._lora_layers(model))


def test_fp8_is_picked_only_on_hopper_with_the_compiled_engine():
    h100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, memory_gib=79.2, capability="9.0",
                      colab=False)
    for card in (H200, h100):
        plan = engine.plan(gpu_settings(), card)
        assert plan.engine == "compiled" and plan.fp8_base
        assert any("FP8 automático" in reason for reason in plan.reasons)
    assert not engine.plan(gpu_settings(), A100_80).fp8_base  # Ampere has no FP8 tensor cores
    assert not engine.plan(gpu_settings(fp8=False), H200).fp8_base  # --no-fp8 wins
    assert not engine.plan(gpu_settings(), T4).fp8_base
    assert not engine.plan({"batch_size": None, "packing": None, "max_seq_length": 640}, CPU).fp8_base


@pytest.mark.parametrize("device, requested, message", [
    (A100_80, "auto", "no multiplica en FP8"),
    (T4, "auto", "no multiplica en FP8"),  # the T4 now gets the compiled engine: FP8 needs Hopper
    (H200, "eager", "solo existe en el motor compilado"),
    (CPU, "auto", "necesita una GPU"),
])
def test_asking_for_fp8_where_it_cannot_run_is_refused_in_spanish(device, requested, message):
    with pytest.raises(UserError, match=message):
        engine.plan(gpu_settings(fp8=True), device, requested)


def test_fp8_flag_on_cpu_exits_2_and_touches_nothing(stage02_dir, tmp_path):
    out = copy_output(stage02_dir, tmp_path / "salida")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = run_script("03_train_model.py", "--output-dir", str(out), "--fp8", "--max-steps", "1", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--fp8" in result.stderr and "Traceback" not in result.stderr
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
