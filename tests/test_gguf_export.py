"""GGUF export without llama.cpp, read back by transformers; and the Ollama Modelfile beside it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from afinar.export import gguf_export, verify
from afinar.core.embedded import ensure_checkpoint
from afinar.core.errors import UserError
from afinar.export.merge import merge_adapter
from afinar.export.verify import compare_logits, compute_logits, verification_inputs
from afinar.export.modelfile import detect_family, ollama_template, write_modelfile
from afinar.core.prompts import SYSTEM_PROMPT, messages_for

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPANISH = [
    "La fotosíntesis ocurre en los cloroplastos de las células vegetales.",
    "Las mitocondrias producen ATP mediante la respiración celular.",
    "¿En qué se diferencian la mitosis y la meiosis?",
    "El ADN se replica de forma semiconservativa; Watson y Crick lo describieron en 1953.",
]


# ----------------------------------------------------------------------------------------- helpers


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE trained in memory on Spanish text: small, so GGUF read-back takes no time."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(SPANISH * 20 + [SYSTEM_PROMPT] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def _tiny_llama(folder: Path, *, tie: bool = True, rope: dict | None = None, hidden: int = 64,
                intermediate: int = 128, layers: int = 2) -> Path:
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is tiny; larger weights make any layout mistake show in the logits
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.2 * (64 / hidden) ** 0.5)  # the same gain per layer at any width
    model.to(torch.bfloat16).save_pretrained(folder)  # bf16, like the merged model the exporter reads
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_pieces(folder: Path):
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    checkpoint = gguf_export._Checkpoint(folder)
    plans = gguf_export._plan_tensors(checkpoint, config, gguf_export.rope_parameters(config))
    vocab = gguf_export.tokenizer_metadata(tokenizer, config.vocab_size)
    return config, tokenizer, checkpoint, plans, vocab


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def _render_ollama(template: str, turns: list[dict[str, str]]) -> str:
    """What Ollama sends for a template without .Messages: one render per turn, the last one cut just
    after {{ .Response }}. Handles the subset our templates use (flat `if` blocks and fields); the same
    templates rendered by Go's text/template gave identical text."""

    def render(text: str, values: dict[str, str]) -> str:
        text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}",
                      lambda m: m.group(2) if values.get(m.group(1)) else "", text, flags=re.S)
        return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), text)

    marker = "{{ .Response }}"
    last = template[: template.index(marker) + len(marker)]
    return "".join(render(last if i == len(turns) - 1 else template, t) for i, t in enumerate(turns))


# ------------------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf_export")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ensure_checkpoint(), dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    del base
    merge_adapter(ensure_checkpoint(), root / "adapter", root / "merged_16bit", dtype="bfloat16")
    return root / "merged_16bit"


@pytest.fixture(scope="module")
def exported(merged_dir):
    out = merged_dir.parent / "gguf"
    return gguf_export.export_gguf(merged_dir, out, ("f16", "q8_0")), out


@pytest.mark.slow
def test_export_writes_two_verified_files(exported):
    records, out = exported
    assert [r["type"] for r in records] == ["f16", "q8_0"]
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]  # no temp files
    for record in records:
        assert Path(record["path"]).stat().st_size == record["bytes"]
        assert record["verification"]["tokenizer_ids_match"] is True
    f16, q8 = (r["verification"] for r in records)
    assert f16["relative_max_diff"] <= gguf_export.F16_MAX_RELATIVE_DIFF and f16["top1_agreement"] >= 0.99
    assert q8["top1_agreement"] >= gguf_export.Q8_0_MIN_TOP1
    assert q8["relative_max_diff"] <= gguf_export.Q8_0_MAX_RELATIVE_DIFF
    assert records[1]["bytes"] < 0.6 * records[0]["bytes"]  # Q8_0 really is 8.5 bits per weight


@pytest.mark.slow
def test_q4_k_m_of_smollm2_verified_with_llama_cpp_mix(merged_dir, tmp_path):
    (record,) = gguf_export.export_gguf(merged_dir, tmp_path, ("q4_k_m",))
    check = record["verification"]
    assert check["tokenizer_ids_match"] is True and check["chat_template"] is True
    assert check["top1_agreement"] >= gguf_export.Q4_K_M_MIN_TOP1
    assert check["relative_max_diff"] <= gguf_export.Q4_K_M_MAX_RELATIVE_DIFF
    # 576-wide rows: K-quants fall back as in llama.cpp; only ffn_down (1536 = 6×256) stays a K-quant.
    assert check["tensor_types"] == {"F32": 61, "Q8_0": 15, "Q5_0": 166, "Q6_K": 14, "Q4_K": 16}
    reader, fields = _fields(Path(record["path"]))
    assert fields["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    tensors = {t.name: t.tensor_type.name for t in reader.tensors}
    assert tensors["blk.0.ffn_down.weight"] == "Q6_K" and tensors["blk.3.ffn_down.weight"] == "Q4_K"
    f16_bytes = 2 * sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert record["bytes"] < 0.45 * f16_bytes  # measured 105 MB against 271 MB in F16


@pytest.mark.slow
def test_f16_file_read_back_independently(exported, merged_dir):
    _, out = exported
    text = "<|im_start|>user\nExplica el papel del ARN mensajero en 3 frases.<|im_end|>\n<|im_start|>assistant\n"
    original_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    ids = original_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert gguf_tokenizer.decode(ids) == text

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    result = compare_logits(compute_logits(merged, [ids]), compute_logits(from_gguf, [ids]))
    assert result["relative_max_diff"] < gguf_export.F16_MAX_RELATIVE_DIFF
    assert result["top1_agreement"] == 1.0


@pytest.mark.slow
def test_gguf_metadata_carries_model_tokenizer_and_template(exported, merged_dir):
    _, out = exported
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    for name, file_type, weight_type in (("model-f16.gguf", 1, "F16"), ("model-q8_0.gguf", 7, "Q8_0")):
        reader, fields = _fields(out / name)
        assert fields["general.architecture"] == "llama"
        assert fields["general.file_type"] == file_type
        assert fields["llama.block_count"] == 30 and fields["llama.embedding_length"] == 576
        assert fields["llama.attention.head_count"] == 9 and fields["llama.attention.head_count_kv"] == 3
        assert fields["llama.feed_forward_length"] == 1536 and fields["llama.context_length"] == 8192
        assert fields["llama.rope.freq_base"] == pytest.approx(100000.0)
        assert fields["llama.rope.dimension_count"] == 64 and fields["llama.vocab_size"] == 49152
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
        tokens = fields["tokenizer.ggml.tokens"]
        assert len(tokens) == 49152 and tokens[2] == "<|im_end|>"
        assert fields["tokenizer.ggml.token_type"][2] == gguf.TokenType.CONTROL
        assert fields["tokenizer.ggml.token_type"][500] == gguf.TokenType.NORMAL
        assert len(fields["tokenizer.ggml.merges"]) == 48900
        assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert fields["tokenizer.ggml.padding_token_id"] == 0 and fields["tokenizer.ggml.add_bos_token"] is False
        assert fields["tokenizer.chat_template"] == tokenizer.chat_template
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors and "rope_freqs.weight" not in tensors  # tied; default rope
        assert len(tensors) == 2 + 30 * 9
        assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values() if len(t.shape) == 1)
        assert all(t.tensor_type.name == weight_type for t in tensors.values() if len(t.shape) == 2)
        assert list(tensors["blk.0.attn_k.weight"].shape) == [576, 192]  # GGUF order: (in, out)
        quant_version = gguf.GGML_QUANT_VERSION if weight_type == "Q8_0" else None
        assert fields.get("general.quantization_version") == quant_version


# -------------------------------------------------------------------------------- q/k permutation


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_permute_qk_is_undone_by_transformers_reader(heads, kv_heads):
    rng = np.random.default_rng(0)
    head_dim = 8
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    q = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
    k = rng.standard_normal((kv_heads * head_dim, 24)).astype(np.float32)
    q_gguf, k_gguf = gguf_export.permute_qk(q, heads), gguf_export.permute_qk(k, kv_heads)
    assert not np.array_equal(q_gguf, q) and not np.array_equal(k_gguf, k)
    assert np.array_equal(processor.process(q_gguf, "blk.0.attn_q.weight").weights, q)
    assert np.array_equal(processor.process(k_gguf, "blk.0.attn_k.weight").weights, k)
    # Within a head, row 2i takes HF row i and row 2i+1 takes HF row i + head_dim/2 (rotate-half pairs).
    assert np.array_equal(q_gguf[1], q[head_dim // 2]) and np.array_equal(q_gguf[2], q[1])


def test_export_without_permutation_gives_another_model(tmp_path):
    folder = _tiny_llama(tmp_path / "tiny")
    config, tokenizer, checkpoint, plans, vocab = _tiny_pieces(folder)
    out_type = gguf_export._out_types()["f16"]
    inputs = verification_inputs(tokenizer)
    reference = compute_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), inputs)
    results = {}
    for permute in (True, False):
        path = tmp_path / f"permute-{permute}.gguf"
        gguf_export._write_file(path, checkpoint, plans, config, vocab, out_type, "tiny", permute=permute)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        results[permute] = compare_logits(reference, compute_logits(model, inputs))
    assert results[True]["relative_max_diff"] < gguf_export.F16_MAX_RELATIVE_DIFF
    assert results[True]["top1_agreement"] == 1.0
    assert results[False]["relative_max_diff"] > 10 * gguf_export.F16_MAX_RELATIVE_DIFF
    assert results[False]["top1_agreement"] < 0.9


# ------------------------------------------------------------------------------- other converter paths


def test_llama3_rope_freqs_tensor(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    folder = _tiny_llama(tmp_path / "tiny", rope=rope)
    (record,) = gguf_export.export_gguf(folder, tmp_path / "gguf", ("f16",))
    assert record["verification"]["rope_freqs_ok"] is True
    assert record["verification"]["top1_agreement"] >= gguf_export.F16_MIN_TOP1  # transformers read it back

    reader, _ = _fields(tmp_path / "gguf" / "model-f16.gguf")
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    stored = np.asarray(tensor.data, dtype=np.float32)
    head_dim = 64 // 4
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](copy.deepcopy(config), "cpu")
    default = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert stored.shape == (head_dim // 2,)
    np.testing.assert_allclose(stored, (default / scaled.double()).numpy(), rtol=1e-5)
    np.testing.assert_allclose(stored, gguf_export.llama3_rope_factors(rope, head_dim), rtol=1e-7)
    # All three bands of llama3 scaling appear: untouched, blended and fully divided by the factor.
    assert stored[0] == 1.0 and stored[-1] == pytest.approx(32.0) and np.any((stored > 1.0) & (stored < 32.0))


@pytest.mark.parametrize("out_type,file_type,k_types,max_rmse", [
    ("q4_k_m", 15, {"Q4_K", "Q6_K"}, 0.16), ("q5_k_m", 17, {"Q5_K", "Q6_K"}, 0.08),
    ("q4_0", 2, {"Q4_0", "Q6_K"}, 0.16), ("q5_0", 8, {"Q5_0", "Q6_K"}, 0.08)])
def test_k_quant_file_holds_the_weights_in_llama_cpp_layout(tmp_path, out_type, file_type, k_types, max_rmse):
    # Rows of 256 values, so the K-quants themselves are used (SmolLM2's 576 falls back; tested elsewhere).
    folder = _tiny_llama(tmp_path / "tiny", hidden=256, intermediate=512, layers=8)
    (record,) = gguf_export.export_gguf(folder, tmp_path / "gguf", (out_type,), verify=False)
    reader, fields = _fields(Path(record["path"]))
    assert fields["general.file_type"] == file_type
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    config, _, checkpoint, plans, _ = _tiny_pieces(folder)
    expected = gguf_export.tensor_types(plans, gguf_export._out_types()[out_type], 8, 4, 2)
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [p.name for p in gguf_export.llama_order(plans)]  # llama-quantize's order
    assert {n: t.tensor_type for n, t in tensors.items()} == expected
    assert {t.tensor_type.name for t in tensors.values()} >= k_types | {"F32"}
    assert tensors["token_embd.weight"].tensor_type.name == "Q6_K"  # tied embeddings = output matrix
    # Every matrix, dequantized by the gguf package, is the checkpoint's (q/k rows permuted as llama.cpp
    # expects), within the error of its type; the bytes are those of the reference quantizer.
    for plan in plans:
        if len(plan.shape) < 2:
            continue
        original = checkpoint.get(plan.hf_key)
        if plan.permute_heads:
            original = gguf_export.permute_qk(original, plan.permute_heads)
        stored = tensors[plan.name]
        assert np.array_equal(np.asarray(stored.data), gguf_export.quantize(original, stored.tensor_type))
        restored = gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type)
        assert restored.shape == original.shape
        relative_rmse = np.sqrt(np.mean((restored - original) ** 2)) / original.std()
        assert relative_rmse < max_rmse, (plan.name, relative_rmse)
    # transformers reads the file back into the same model (weights close to the original ones).
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=Path(record["path"]).name,
                                                 dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for key, value in model.state_dict().items():
        if value.ndim == 2:
            diff = (value - original[key]).pow(2).mean().sqrt() / original[key].std()
            assert diff < max_rmse, (key, float(diff))


def test_untied_model_keeps_its_output_matrix(tmp_path):
    folder = _tiny_llama(tmp_path / "tiny", tie=False)
    records = gguf_export.export_gguf(folder, tmp_path / "gguf", ("q8_0",))
    reader, _ = _fields(tmp_path / "gguf" / "model-q8_0.gguf")
    assert "output.weight" in {t.name for t in reader.tensors}
    assert records[0]["verification"]["top1_agreement"] >= gguf_export.Q8_0_MIN_TOP1


def test_refuses_bad_requests_with_spanish_errors(tmp_path, monkeypatch):
    folder = _tiny_llama(tmp_path / "tiny")
    with pytest.raises(UserError, match="Tipo GGUF no admitido"):
        gguf_export.export_gguf(folder, tmp_path / "gguf", ("q4_k",))
    with pytest.raises(UserError, match="fusión del adaptador"):
        gguf_export.export_gguf(tmp_path / "nothing", tmp_path / "gguf")
    monkeypatch.setattr(verify, "SPACE_MARGIN", 1e15)
    with pytest.raises(UserError, match="No hay espacio en disco"):
        gguf_export.export_gguf(folder, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
    monkeypatch.undo()

    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="arquitectura llama"):
        gguf_export.export_gguf(folder, tmp_path / "gguf")


# -------------------------------------------------------------------------------------- Modelfile


def test_modelfile_for_smollm2_matches_its_chat_template(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint())
    gguf_path = tmp_path / "gguf" / "model-q8_0.gguf"
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(b"GGUF")
    record = write_modelfile(gguf_path, gguf_path.parent / "Modelfile", tokenizer)
    text = (gguf_path.parent / "Modelfile").read_text()
    assert record["family"] == "chatml" and text.startswith("FROM ./model-q8_0.gguf\n")
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.3" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)

    question, answer, follow_up = "¿Qué es un gen?", "Un segmento de ADN.", "¿Y un alelo?"
    expected = tokenizer.apply_chat_template(messages_for({"instruction": question}, with_answer=False),
                                             add_generation_prompt=True, tokenize=False)
    assert _render_ollama(template, [{"System": SYSTEM_PROMPT, "Prompt": question}]) == expected
    conversation = messages_for({"instruction": question, "output": answer}) + [{"role": "user", "content": follow_up}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    turns = [{"System": SYSTEM_PROMPT, "Prompt": question, "Response": answer}, {"Prompt": follow_up}]
    assert _render_ollama(template, turns) == expected

    write_modelfile(gguf_path, tmp_path / "Modelfile", tokenizer)
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./gguf/model-q8_0.gguf\n")


def test_modelfile_for_llama3_family(tmp_path):
    tokenizer = _tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.chat_template = LLAMA3_LIKE
    gguf_path = tmp_path / "model-q8_0.gguf"
    gguf_path.write_bytes(b"GGUF")
    record = write_modelfile(gguf_path, tmp_path / "Modelfile", tokenizer)
    text = (tmp_path / "Modelfile").read_text()
    assert record["family"] == "llama3"
    for stop in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert f'PARAMETER stop "{stop}"' in text
    assert "<|im_end|>" not in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    expected = tokenizer.apply_chat_template(messages_for({"instruction": "¿Qué es un gen?"}, with_answer=False),
                                             add_generation_prompt=True, tokenize=False)
    # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token), so the template leaves it out.
    rendered = _render_ollama(template, [{"System": SYSTEM_PROMPT, "Prompt": "¿Qué es un gen?"}])
    assert "<|begin_of_text|>" + rendered == expected
    assert "Cutting Knowledge Date: December 2023" in ollama_template("llama3", "... Cutting Knowledge Date ...")
    assert "Cutting Knowledge Date" not in template


def test_family_detection_from_template_or_tokens():
    assert detect_family(CHATML) == "chatml"
    assert detect_family(LLAMA3_LIKE) == "llama3"
    assert detect_family(None, {"<|start_header_id|>": 5, "<|eot_id|>": 6}) == "llama3"
    with pytest.raises(UserError, match="formato de chat"):
        detect_family("{{ messages }}", {"<s>": 1})
