"""Stage 03's engine choice per card, the packing that fills rows, and the compiled path against eager."""

from __future__ import annotations

import json
import random

import pytest

from afinar.train import engine
from afinar.core.environment import DeviceInfo
from afinar.core.errors import UserError
from afinar.train.packing import Collator, pack_in_order
from afinar.core.prompts import IGNORE_INDEX

CPU = DeviceInfo(kind="cpu", name="x86", bf16=False, memory_gib=None, capability=None, colab=False)
T4 = DeviceInfo(kind="cuda", name="Tesla T4", bf16=False, memory_gib=14.7, capability="7.5", colab=True)
L4 = DeviceInfo(kind="cuda", name="NVIDIA L4", bf16=True, memory_gib=22.0, capability="8.9", colab=True)
A100_40 = DeviceInfo(kind="cuda", name="A100-SXM4-40GB", bf16=True, memory_gib=39.5, capability="8.0", colab=False)
A100_80 = DeviceInfo(kind="cuda", name="A100-SXM4-80GB", bf16=True, memory_gib=79.1, capability="8.0", colab=False)
H200 = DeviceInfo(kind="cuda", name="NVIDIA H200", bf16=True, memory_gib=139.8, capability="9.0", colab=False)


def gpu_settings(**extra):
    # What stage 02 records on a GPU: batch size and packing left on automatic.
    return {"backend": "unsloth", "load_in_4bit": True, "max_seq_length": 2048, "batch_size": None,
            "packing": None, **extra}


def test_cpu_trains_eager_with_the_cpu_defaults():
    plan = engine.plan({"backend": "hf", "max_seq_length": 640, "batch_size": 4, "packing": True}, CPU)
    assert (plan.engine, plan.backend, plan.batch_size, plan.packing, plan.compile_layers) == ("eager", "hf", 4, True, False)
    # Padded slots cost as much as real tokens on a CPU: examples may go back to fill one of the last rows.
    assert plan.open_rows == engine.CPU_OPEN_ROWS > 1


@pytest.mark.parametrize("requested", ["compiled", "unsloth"])
def test_gpu_engines_are_refused_on_cpu_with_a_message(requested):
    with pytest.raises(UserError, match="--engine"):
        engine.plan({"backend": "hf", "max_seq_length": 640, "batch_size": 4, "packing": True}, CPU, requested)


def test_a_16gb_t4_gets_the_compiled_engine_in_fp16_within_12_gib():
    """Issue 16: the T4 plan packs and compiles like the large cards, on an fp16 base, without FP8."""
    plan = engine.plan(gpu_settings(), T4)
    assert plan.engine == "compiled" and plan.precision == "fp16" and not plan.fp8_base
    assert plan.packing and plan.compile_layers and plan.gradient_checkpointing and plan.dequantize_4bit
    assert plan.attn_implementation == "flex_attention"  # with the fallback of engine.kernel_fallback
    estimate = engine.FIXED_GIB + plan.batch_size * 2048 * engine.ACTIVATION_GIB_PER_TOKEN
    assert plan.batch_size >= 8 and estimate <= 12.0, (plan.batch_size, estimate)
    with pytest.raises(UserError, match="FP8"):
        engine.plan(gpu_settings(fp8=True), T4)


def test_cards_below_14_gib_or_older_than_the_t4_keep_unsloth():
    small = DeviceInfo(kind="cuda", name="RTX 3060", bf16=True, memory_gib=11.6, capability="8.6", colab=False)
    plan = engine.plan(gpu_settings(), small)
    assert plan.engine == "unsloth" and plan.gradient_checkpointing and plan.batch_size == 8
    v100 = DeviceInfo(kind="cuda", name="Tesla V100", bf16=False, memory_gib=15.8, capability="7.0", colab=False)
    assert engine.plan(gpu_settings(), v100).engine == "unsloth"
    with pytest.raises(UserError, match="7.5"):
        engine.plan(gpu_settings(), v100, "compiled")


def test_mid_size_bf16_cards_compile_in_bf16():
    for device in (L4, DeviceInfo(kind="cuda", name="RTX 5090", bf16=True, memory_gib=31.4, capability="12.0",
                                  colab=False)):
        plan = engine.plan(gpu_settings(), device)
        assert plan.engine == "compiled" and plan.precision == "bf16"
        assert engine.FIXED_GIB + plan.batch_size * 2048 * engine.ACTIVATION_GIB_PER_TOKEN <= device.memory_gib * 0.8


@pytest.mark.parametrize("device", [A100_40, A100_80, H200])
def test_large_bf16_cards_get_the_compiled_engine_with_a_dequantized_base(device):
    plan = engine.plan(gpu_settings(), device)
    assert plan.engine == "compiled" and plan.backend == "hf" and plan.compile_layers
    assert plan.dequantize_4bit and plan.attn_implementation == "flex_attention" and plan.packing
    assert plan.open_rows > 1
    assert plan.batch_size * 2048 <= engine.MAX_TOKENS_PER_STEP
    # The estimate behind the batch stays inside the card, with the measured per-token activations.
    per_token = (engine.ACTIVATION_GIB_PER_TOKEN if plan.gradient_checkpointing
                 else engine.ACTIVATION_GIB_PER_TOKEN_NO_CHECKPOINTING)
    estimate = engine.FIXED_GIB + plan.batch_size * 2048 * per_token
    assert estimate <= device.memory_gib * 0.8
    assert not engine.plan(gpu_settings(load_in_4bit=False), device).dequantize_4bit
    assert plan.precision == "bf16"


def test_checkpointing_goes_only_where_the_activations_fit_without_it():
    """Without checkpointing a step does not recompute each layer's forward (+31 % on the H200) for ~5 times the
    activation memory: off where 16 rows of 2048 fit without it, on where they do not."""
    for device in (H200, A100_80):
        plan = engine.plan(gpu_settings(), device)
        assert not plan.gradient_checkpointing and plan.batch_size >= engine.MIN_ROWS_WITHOUT_CHECKPOINTING
        assert any("sin checkpointing" in reason for reason in plan.reasons)
        assert plan.trainer_checkpointing is False  # what SFTConfig gets, so TRL's default does not turn it on
    assert engine.plan(gpu_settings(), H200).batch_size == 32
    for device in (T4, L4, A100_40):
        plan = engine.plan(gpu_settings(), device)
        assert plan.gradient_checkpointing and any("checkpointing de gradientes:" in r for r in plan.reasons)
    # A batch the user asks for decides as well: 48 rows of 2048 do not fit the H200 without recomputing.
    assert engine.plan(gpu_settings(batch_size=48), H200).gradient_checkpointing
    assert not engine.plan(gpu_settings(batch_size=24), H200).gradient_checkpointing
    # Short rows fit many more: a 16 GB card trains rows of 256 tokens without checkpointing.
    assert not engine.plan(gpu_settings(max_seq_length=256), T4).gradient_checkpointing


def test_small_datasets_keep_enough_steps_and_user_choices_win():
    small = engine.plan(gpu_settings(), H200, packed_rows=30)  # tu_dataset.json at 2048 tokens a row
    assert small.batch_size == 1
    assert any("pasos por época" in reason for reason in small.reasons)
    assert engine.plan(gpu_settings(batch_size=6, packing=False), H200).batch_size == 6
    assert engine.plan(gpu_settings(batch_size=6, packing=False), H200).packing is False


def test_engine_flag_rejects_unknown_values():
    with pytest.raises(UserError, match="--engine"):
        engine.plan(gpu_settings(), H200, "turbo")


# ------------------------------------------------------------------------------------------------- packing


def _rows(lengths):
    # Each example's tokens carry its index, so the packed rows say where every example went.
    return [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]


def test_one_open_row_is_strict_order():
    lengths = [300, 900, 50, 700, 1200, 40, 400]
    packed = pack_in_order(_rows(lengths), 1024, open_rows=1)
    flat = [t for row in packed for t in dict.fromkeys(row["input_ids"])]
    assert flat == list(range(len(lengths)))


def test_open_rows_fill_rows_and_move_examples_at_most_k_rows_back():
    rng = random.Random(0)
    lengths = [max(24, min(1984, int(rng.lognormvariate(5.9, 0.7)))) for _ in range(1500)]
    strict = pack_in_order(_rows(lengths), 2048, open_rows=1)
    filled = pack_in_order(_rows(lengths), 2048, open_rows=8)
    fill = lambda rows: sum(lengths) / (len(rows) * 2048)  # noqa: E731
    assert fill(filled) > fill(strict) + 0.05, (fill(strict), fill(filled))
    row_of = {}
    for r, row in enumerate(filled):
        assert len(row["input_ids"]) <= 2048
        assert row["position_ids"][0] == 0
        for i in dict.fromkeys(row["input_ids"]):
            row_of[i] = r
    assert sorted(row_of) == list(range(len(lengths))), "every example packed exactly once"
    highest = -1
    for i in range(len(lengths)):
        assert row_of[i] >= highest - 8, f"example {i} moved more than 8 rows back"
        highest = max(highest, row_of[i])


def test_collator_fixed_shape_pads_rows_and_length_without_labels():
    batch = Collator(pad_token_id=0, pad_to=16, rows=4)([
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "position_ids": [0, 1, 2]},
        {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]},
    ])
    assert batch["input_ids"].shape == (4, 16) and batch["position_ids"].shape == (4, 16)
    assert int(batch["real_tokens"]) == 5
    assert (batch["labels"][2:] == IGNORE_INDEX).all() and (batch["labels"][0, 3:] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------ compiled layers vs eager


@pytest.mark.slow
def test_compiled_layers_train_the_same_losses_as_eager(tmp_path, embedded_path):
    """The compiled engine's pieces (torch.compile per layer, fixed-shape rows, filled packing) on CPU:
    the same data and seed give the same loss at every step as the eager path."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from afinar.train import modeling, training
    from afinar.core.layout import OutputLayout
    from afinar.core.prompts import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tokenizer)
    entries = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:40]
    settings = {"max_seq_length": 512, "learning_rate": 1e-3, "epochs": 1, "max_steps": 4, "batch_size": 3,
                "grad_accum": 1, "seed": 0, "warmup_ratio": 0.0, "save_steps": 10**6, "save_minutes": 10**6,
                "logging_steps": 1}

    def run(compiled: bool) -> tuple[list[float], float]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
        model = modeling.add_lora(LlamaForCausalLM(config), backend="hf", lora_r=8, lora_alpha=8, lora_dropout=0.0,
                                  seed=0)
        if compiled:
            engine.compile_layers_(model)
        layout = OutputLayout.at(tmp_path / ("compiled" if compiled else "eager"))
        training.train(model, tokenizer, entries, layout=layout, settings=settings, precision="fp32", packing=True,
                       fixed_length=compiled, open_rows=8)
        trained = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
        # The adapter file of a compiled model must carry the plain PEFT keys that 04 and the Hub expect.
        modeling.save_adapter(model, tokenizer, layout.adapter, "prueba")
        keys.append(set(load_file(str(layout.adapter / "adapter_model.safetensors"))))
        return [json.loads(line)["loss"] for line in layout.metrics.read_text().splitlines()], trained

    keys: list[set] = []
    (eager, eager_b), (compiled, compiled_b) = run(False), run(True)
    assert keys[0] == keys[1] and all("_orig_mod" not in k for k in keys[1])
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-3), (eager, compiled)
    # LoRA B starts at zero: both paths moved it, by the same amount.
    assert eager_b > 0 and compiled_b == pytest.approx(eager_b, rel=1e-2)


def _failing_backend(graph_module, example_inputs):
    # What a card whose shared memory cannot hold a Triton template does on its first step: the compiler fails.
    raise RuntimeError("out of resource: shared memory, Required: 81920, Hardware limit: 65536")



def _tiny_lora_run(embedded_path, entries: int, max_seq_length: int, steps: int):
    """(model, tokenizer, entries, settings): a 2-layer Llama with LoRA and the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from afinar.train import modeling
    from afinar.core.prompts import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    ensure_pad_token(tokenizer)
    data = json.loads(open("tu_dataset.json", encoding="utf-8").read())[:entries]
    settings = {"max_seq_length": max_seq_length, "learning_rate": 1e-3, "epochs": 1, "max_steps": steps,
                "batch_size": 2, "grad_accum": 1, "seed": 0, "warmup_ratio": 0.0, "save_steps": 10**6,
                "save_minutes": 10**6, "logging_steps": 1}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = modeling.add_lora(LlamaForCausalLM(config), backend="hf", lora_r=8, lora_alpha=8, lora_dropout=0.0,
                              seed=0)
    return model, tokenizer, data, settings


def test_a_kernel_the_card_cannot_run_falls_back_on_the_first_step(tmp_path, embedded_path):
    """Issue 16: the compiled plan's first step fails to compile (as flex attention's templates can on a T4);
    the trainer drops to SDPA, then to uncompiled layers, retries the same batch, and trains every step."""
    from afinar.train import training
    from afinar.core.layout import OutputLayout

    model, tokenizer, entries, settings = _tiny_lora_run(embedded_path, entries=12, max_seq_length=256, steps=2)
    for layer in engine.decoder_layers(model):
        layer.compile(backend=_failing_backend)
    plan = engine.Plan("compiled", "hf", 2, True, False, attn_implementation="flex_attention",
                       compile_layers=True, open_rows=8)
    layout = OutputLayout.at(tmp_path)
    metrics = training.train(model, tokenizer, entries, layout=layout, settings=settings, precision="fp32",
                             packing=True, fixed_length=True, open_rows=8,
                             kernel_fallback=engine.kernel_fallback(model, plan))
    assert metrics["global_step"] == 2
    assert (plan.attn_implementation, plan.compile_layers) == ("sdpa", False)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert all(layer._compiled_call_impl is None for layer in engine.decoder_layers(model))
    assert sum("no pudo ejecutar el primer paso" in reason for reason in plan.reasons) == 2
    losses = [json.loads(line)["loss"] for line in layout.metrics.read_text().splitlines()]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    # Tokens are counted once per step, not once per attempt: the 4 rows of the 2 steps, exactly.
    rows, _ = training.build_dataset(entries, tokenizer, 256, True, 8)
    assert metrics["real_tokens"] == sum(len(row["input_ids"]) for row in list(rows)[:4])


def test_an_error_that_is_not_a_kernel_error_is_not_hidden():
    """Nothing left to drop: the error reaches the user instead of looping."""
    plan = engine.Plan("eager", "hf", 4, True, False)
    assert engine.kernel_fallback(object(), plan) is None


def test_a_4bit_model_keeps_its_adapter_in_fp32_through_trl(tmp_path, embedded_path):
    """TRL 1.15 casts the LoRA weights of any model flagged as 4-bit to bf16; in fp16 on a T4 the gradient
    scaler then fails on the first step. training.train puts PEFT's fp32 back (the flag is TRL's own test)."""
    import torch

    from afinar.train import training
    from afinar.core.layout import OutputLayout

    model, tokenizer, entries, settings = _tiny_lora_run(embedded_path, entries=6, max_seq_length=128, steps=1)
    model.is_loaded_in_4bit = True  # what TRL reads to decide the cast
    training.train(model, tokenizer, entries, layout=OutputLayout.at(tmp_path), settings=settings,
                   precision="fp32", packing=True)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}, dtypes


def test_the_setup_summary_names_xformers_and_why_it_is_not_needed():
    """Issue 16: 01_setup.sh's summary says what xformers is for; here (no xformers) it says why it is absent."""
    import importlib.util
    import subprocess
    import sys

    from afinar.core import doctor

    if importlib.util.find_spec("xformers") is None:
        assert "no hace falta" in doctor.xformers_status("cuda") and "motor compilado" in doctor.xformers_status("cuda")
    out = subprocess.run([sys.executable, "-m", "afinar.core.doctor"], capture_output=True, text=True)
    assert "xformers:" in out.stdout


@pytest.mark.parametrize("device", [T4, H200])
def test_orpo_is_refused_on_gpu_before_the_data_work(device):
    """--preference orpo needs the CPU plan's rows that share the prompt: a GPU run stops at step 3 of stage 03,
    in Spanish, and points to DPO; the CPU plan lets it through."""
    from afinar.stages.stage_train import _check_engine

    with pytest.raises(UserError, match="--preference orpo solo está disponible en CPU.*--preference dpo"):
        _check_engine(gpu_settings(preference="orpo"), device)
    _check_engine(gpu_settings(preference="dpo"), device)
    _check_engine({"backend": "hf", "max_seq_length": 640, "batch_size": 1, "packing": True, "preference": "orpo"},
                  CPU)
