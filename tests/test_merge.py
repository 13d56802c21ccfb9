"""Merging a LoRA adapter into its base: exactness in fp32, bounded rounding in bf16, loud failures."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from afinar.export import merge, verify
from afinar.core.embedded import ensure_checkpoint
from afinar.core.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA adapter with non-zero B, so merging really changes the weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def _tiny_base(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer random Llama with the embedded tokenizer: the same code paths in a second."""
    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _safetensors_keys(folder: Path) -> list[str]:
    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


@pytest.fixture(scope="module")
def embedded_adapter(tmp_path_factory) -> Path:
    return _random_adapter(ensure_checkpoint(), tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def merged_bf16(embedded_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged_16bit"
    result = merge.merge_adapter(ensure_checkpoint(), embedded_adapter, out, dtype="bfloat16")
    return result, out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = _tiny_base(root / "base")
    return base, _random_adapter(base, root / "adapter")


# ------------------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_float32_merge_matches_unmerged_peft(embedded_adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge.merge_adapter(ensure_checkpoint(), embedded_adapter, out, dtype="float32")
    assert result["verification"]["max_abs_logit_diff"] < 1e-3
    assert result["verification"]["top1_agreement"] == 1.0
    assert result["verification"]["stored_dtypes"] == ["F32"]

    # An independent check on a text the function never saw: PEFT unmerged vs the folder on disk.
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("La célula procariota carece de núcleo definido y de orgánulos.").input_ids])
    base = AutoModelForCausalLM.from_pretrained(ensure_checkpoint(), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, embedded_adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected, got = reference(ids).logits, merged(ids).logits
    assert (expected - got).abs().max().item() < 1e-3
    # The adapter really changes the model, so the agreement above is not trivial.
    with torch.inference_mode(), reference.disable_adapter():
        assert (reference(ids).logits - expected).abs().max().item() > 1.0


@pytest.mark.slow
def test_bfloat16_merge_is_within_tolerance_and_plain(merged_bf16):
    result, out = merged_bf16
    check = result["verification"]
    assert result["merged_onto"] == "original" and result["warning"] is None
    assert check["stored_dtypes"] == ["BF16"]
    assert check["relative_max_diff"] <= merge.DEFAULT_TOLERANCE["bfloat16"]
    assert check["top1_agreement"] >= merge.MIN_TOP1_AGREEMENT["bfloat16"]
    assert check["positions"] > 100

    names = {p.name for p in out.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"}
    assert expected <= names
    assert not any(n.endswith(".bin") or n.startswith("adapter") for n in names)
    keys = _safetensors_keys(out)
    assert "lm_head.weight" not in keys and not any("lora" in k for k in keys)

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_bfloat16_weights_are_fp32_sums_cast_once(merged_bf16, embedded_adapter):
    """W + scale·B@A is summed in fp32 and rounded to bf16 once (not W rounded, then delta added)."""
    _, out = merged_bf16
    key = "model.layers.3.self_attn.q_proj"
    with safe_open(str(ensure_checkpoint() / "model.safetensors"), framework="pt") as handle:
        base_weight = handle.get_tensor(f"{key}.weight").float()
    adapter = load_file(str(embedded_adapter / "adapter_model.safetensors"))
    lora_a = adapter[f"base_model.model.{key}.lora_A.weight"].float()
    lora_b = adapter[f"base_model.model.{key}.lora_B.weight"].float()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        merged_weight = handle.get_tensor(f"{key}.weight")

    once = (base_weight + (lora_b @ lora_a) * (16 / 16)).to(torch.bfloat16)
    twice = base_weight.to(torch.bfloat16) + ((lora_b @ lora_a) * (16 / 16)).to(torch.bfloat16)
    assert (merged_weight.float() - base_weight).abs().max() > 1e-2  # the adapter is in there
    # Measured: 100% of the entries equal `once`; only ~74% equal `twice`.
    assert (merged_weight == once).float().mean() > 0.999
    assert (merged_weight == twice).float().mean() < 0.95


# ------------------------------------------------------------------------------- failures (tiny model)


def test_corrupted_output_is_rejected_and_not_installed(tiny, tmp_path, monkeypatch):
    base, adapter = tiny
    out = tmp_path / "merged_16bit"
    original_write = merge._write_merged

    def write_then_corrupt(model, tokenizer, generation_config, folder):
        original_write(model, tokenizer, generation_config, folder)
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors["model.layers.1.mlp.down_proj.weight"] *= 3.0
        save_file(tensors, str(path), metadata={"format": "pt"})

    monkeypatch.setattr(merge, "_write_merged", write_then_corrupt)
    with pytest.raises(UserError, match="no reproduce el modelo base"):
        merge.merge_adapter(base, adapter, out, dtype="bfloat16")
    assert not out.exists()
    assert not list(tmp_path.glob(".merged_16bit*"))  # no temporary folder left behind


def test_past_tolerance_raises_and_keeps_previous_output(tiny, tmp_path):
    base, adapter = tiny
    out = tmp_path / "merged_16bit"
    out.mkdir()
    (out / "previous.txt").write_text("export anterior")
    with pytest.raises(UserError, match="tolerancia"):
        merge.merge_adapter(base, adapter, out, dtype="bfloat16", tolerance=1e-9)
    assert (out / "previous.txt").read_text() == "export anterior"


def test_tiny_merge_replaces_previous_output(tiny, tmp_path):
    base, adapter = tiny
    out = tmp_path / "merged_16bit"
    out.mkdir()
    (out / "previous.txt").write_text("export anterior")
    result = merge.merge_adapter(base, adapter, out, dtype="float16", prompts=["¿Qué es una proteína?"])
    assert result["verification"]["prompts"] == 1
    assert result["verification"]["relative_max_diff"] <= merge.DEFAULT_TOLERANCE["float16"]
    assert not (out / "previous.txt").exists() and (out / "model.safetensors").exists()


def test_not_enough_disk_space_is_a_spanish_error(tiny, tmp_path, monkeypatch):
    base, adapter = tiny
    monkeypatch.setattr(verify, "SPACE_MARGIN", 1e12)  # ask for far more than any disk has
    with pytest.raises(UserError, match="No hay espacio en disco"):
        merge.merge_adapter(base, adapter, tmp_path / "merged", dtype="bfloat16")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(UserError, match="hacen falta"):
        verify.ensure_free_space(tmp_path / "a" / "b", 2**62, "una prueba")


def test_adapter_for_another_model_is_a_user_error(tiny, tmp_path):
    base, _ = tiny
    other = _tiny_base(tmp_path / "other", hidden=64)
    wrong_adapter = _random_adapter(other, tmp_path / "wrong_adapter")
    with pytest.raises(UserError, match="no encaja con el modelo base"):
        merge.merge_adapter(base, wrong_adapter, tmp_path / "merged")


def test_bad_inputs_are_user_errors(tiny, tmp_path):
    base, adapter = tiny
    with pytest.raises(UserError, match="adapter_config.json"):
        merge.merge_adapter(base, tmp_path / "missing", tmp_path / "merged")
    with pytest.raises(UserError, match="float16"):
        merge.merge_adapter(base, adapter, tmp_path / "merged", dtype="int8")
    broken = tmp_path / "broken_adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text("{ no es json")
    with pytest.raises(UserError, match="no es un JSON válido"):
        merge.merge_adapter(base, broken, tmp_path / "merged")


# ------------------------------------------------------------------------------- 4-bit base detection


def _copy_with_config(base: Path, folder: Path, **extra) -> Path:
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(extra)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_detects_original_and_4bit_bases(tiny, tmp_path):
    base, adapter = tiny
    assert merge.detect_base_weights(base) == "original"
    nf4 = _copy_with_config(base, tmp_path / "nf4", quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    assert merge.detect_base_weights(nf4) == "dequantized_4bit"
    int8 = _copy_with_config(base, tmp_path / "int8",
                             quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(UserError, match="8 bits"):
        merge.detect_base_weights(int8)

    # Packed weights betray a 4-bit checkpoint even when its config lost the quantization block.
    packed = tmp_path / "packed"
    packed.mkdir()
    shutil.copy(base / "config.json", packed / "config.json")
    save_file({
        "model.layers.0.self_attn.q_proj.weight": torch.zeros((512, 1), dtype=torch.uint8),
        "model.layers.0.self_attn.q_proj.weight.absmax": torch.ones(16),
    }, str(packed / "model.safetensors"), metadata={"format": "pt"})
    assert merge.detect_base_weights(packed) == "dequantized_4bit"

    if importlib.util.find_spec("bitsandbytes") is None:
        # On a CPU machine without bitsandbytes the 4-bit path must stop with a clear message.
        with pytest.raises(UserError, match="bitsandbytes"), pytest.warns(UserWarning, match="4 bits"):
            merge.merge_adapter(nf4, adapter, tmp_path / "merged")
