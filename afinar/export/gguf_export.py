"""Write llama-architecture GGUF files (F16, Q8_0, Q4_0, Q5_0, Q4_K_M, Q5_K_M) without llama.cpp, and check them.

No llama.cpp build is needed: the converter does what llama.cpp's own one does for a Llama model
(q/k row permutation, tied embeddings, llama3 rope factors, 1-D tensors in F32, BPE vocabulary,
chat template), and every file is read back with transformers' GGUF loader and compared with the
merged model before it gets its final name (afinar.export.gguf_check). K-quants (which the `gguf` package
cannot write) come from afinar.export.kquants, and the _M types use llama-quantize's choice of type per tensor
(see `tensor_types`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afinar.core import atomic
from afinar.core.errors import UserError
from afinar.export import kquants, verify
from afinar.export.gguf_check import GgufChecker
from afinar.export.verify import ensure_free_space

ARCH = "llama"

# Bounds checked on every file read back (relative = max|Δlogit| / std of the merged model's logits,
# 311 positions × 49152 logits on the embedded model). F16 holds bf16 weights exactly (bf16 → f16 only
# loses values below 6e-8): measured 1.4e-5; from an fp32 checkpoint, f16 rounding gives 0.006. Q8_0
# keeps ~8 bits per weight with one scale per 32 values: measured 0.17 (base) to 0.21 (base + random
# adapter) with 98% and 94% greedy agreement, so it is judged mainly on greedy agreement (≥ 90%),
# with a loose ceiling on the difference that a broken file exceeds by far: the same export
# without the q/k permutation gives 5.5 and 7% agreement.
F16_MAX_RELATIVE_DIFF = 0.02
F16_MIN_TOP1 = 0.99
Q8_0_MAX_RELATIVE_DIFF = 0.5
Q8_0_MIN_TOP1 = 0.90
# 4- and 5-bit types, same measure, on the base model / base + random adapter (bench/bench_export.py,
# BENCHMARKS.md): Q5_K_M 1.29 / 1.24 with 82% / 79% agreement; Q4_K_M 1.62 / 1.26, 79% / 74%;
# Q5_0 1.99 / 1.54, 79% / 75%; Q4_0 3.45 / 2.93, 56% / 59%. A 135M model loses a lot at 4 bits, and on
# SmolLM2 most matrices fall back from K-quants to Q5_0/Q5_1/Q8_0 (rows of 576 values do not fill
# 256-value super-blocks, see tensor_types). Bounds: about 10 points of agreement and 1.5× the
# difference below/above the worst measurement; a broken layout gives under 10% agreement.
Q5_K_M_MAX_RELATIVE_DIFF, Q5_K_M_MIN_TOP1 = 2.0, 0.70
Q4_K_M_MAX_RELATIVE_DIFF, Q4_K_M_MIN_TOP1 = 2.5, 0.65
Q5_0_MAX_RELATIVE_DIFF, Q5_0_MIN_TOP1 = 3.0, 0.65
Q4_0_MAX_RELATIVE_DIFF, Q4_0_MIN_TOP1 = 5.0, 0.45


@dataclass(frozen=True)
class _OutType:
    tensor_type: Any  # gguf.GGMLQuantizationType for 2-D weights
    file_type: Any  # gguf.LlamaFileType
    max_relative_diff: float
    min_top1: float
    mix: str | None = None  # None: every matrix in tensor_type; "_m": llama-quantize's mix; "plain": its Q4_0/Q5_0


def _out_types() -> dict[str, _OutType]:
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f16": _OutType(Q.F16, F.MOSTLY_F16, F16_MAX_RELATIVE_DIFF, F16_MIN_TOP1),
        "q8_0": _OutType(Q.Q8_0, F.MOSTLY_Q8_0, Q8_0_MAX_RELATIVE_DIFF, Q8_0_MIN_TOP1),
        "q5_k_m": _OutType(Q.Q5_K, F.MOSTLY_Q5_K_M, Q5_K_M_MAX_RELATIVE_DIFF, Q5_K_M_MIN_TOP1, "_m"),
        "q5_0": _OutType(Q.Q5_0, F.MOSTLY_Q5_0, Q5_0_MAX_RELATIVE_DIFF, Q5_0_MIN_TOP1, "plain"),
        "q4_k_m": _OutType(Q.Q4_K, F.MOSTLY_Q4_K_M, Q4_K_M_MAX_RELATIVE_DIFF, Q4_K_M_MIN_TOP1, "_m"),
        "q4_0": _OutType(Q.Q4_0, F.MOSTLY_Q4_0, Q4_0_MAX_RELATIVE_DIFF, Q4_0_MIN_TOP1, "plain"),
    }


# What each type is, for the Modelfile and the model card (Spanish: users read it).
TYPE_DESCRIPTIONS = {
    "f16": "F16: 16 bits por peso, sin pérdida apreciable",
    "q8_0": "Q8_0: 8,5 bits por peso, casi sin pérdida",
    "q5_k_m": "Q5_K_M: 5,5 bits por peso en la mayoría de las matrices y 6,6 (Q6_K) en las más sensibles, "
              "con la mezcla de llama-quantize",
    "q5_0": "Q5_0: 5,5 bits por peso",
    "q4_k_m": "Q4_K_M: 4,5 bits por peso en la mayoría de las matrices y 6,6 (Q6_K) en las más sensibles, "
              "con la mezcla de llama-quantize (el tipo por defecto de la biblioteca de Ollama)",
    "q4_0": "Q4_0: 4,5 bits por peso",
}


def check_types(types) -> list[str]:
    """The requested --gguf types, lower-cased; UserError naming the option for an unknown one.

    Cheap (no model is read), so stage 04 calls it before any heavy work.
    """
    known = list(TYPE_DESCRIPTIONS)
    types = [str(t).strip().lower() for t in types if str(t).strip()]
    bad = [t for t in types if t not in known]
    if bad or not types:
        raise UserError(f"Tipo GGUF no admitido en --gguf: {', '.join(bad) or '(ninguno)'}. "
                        f"Usa alguno de: {', '.join(known)} (o none).")
    return types


def gguf_file_name(out_type: str) -> str:
    return f"model-{out_type}.gguf"


# ------------------------------------------------------------------------------------------ tensors


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows → the interleaved pairs llama.cpp's llama rope expects.

    transformers rotates the two halves of each head (x[i], x[i + d/2]); ggml's normal rope rotates
    adjacent pairs (x[2i], x[2i+1]). Reordering the output rows of q_proj and k_proj per head makes both
    compute the same attention scores. k_proj takes the number of KV heads.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        raise UserError(f"Una proyección q/k tiene {rows} filas, que no se reparten en {n_head} cabezas pares.")
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as llama.cpp reads them from `rope_freqs.weight`.

    Llama 3.1 leaves wavelengths shorter than original_context/high_freq_factor alone, divides those
    longer than original_context/low_freq_factor by `factor`, and blends smoothly in between. ggml
    divides each rotation frequency by the stored value, so the stored value is inv_freq / scaled_freq.
    """
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))

    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, divisors)
    divisors = np.where(wavelen > original / low, factor, divisors)
    return divisors.astype(np.float32)


def rope_parameters(config) -> dict[str, Any]:
    """rope_theta, rope_type and scaling keys, from transformers 5's rope_parameters or the older fields."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    for key, value in dict(legacy).items():
        rope.setdefault(key, value)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return rope


@dataclass(frozen=True)
class _TensorPlan:
    hf_key: str | None  # None for tensors the converter computes (rope_freqs)
    name: str
    shape: tuple[int, ...]
    permute_heads: int = 0  # > 0: apply permute_qk with this many heads


class _Checkpoint:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"No hay pesos *.safetensors en {model_dir}: ejecuta antes la fusión del adaptador.")
        self.folder = model_dir
        self._handles = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, Any] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt")
            self._handles[file] = handle
            for key in handle.keys():
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
                self._where[key] = handle

    def get(self, key: str) -> np.ndarray:
        import torch

        return self._where[key].get_tensor(key).to(torch.float32).numpy()


def _plan_tensors(checkpoint: _Checkpoint, config, rope: dict[str, Any]) -> list[_TensorPlan]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_dim = _head_dim(config)
    plans: list[_TensorPlan] = []
    unknown = []
    if rope["rope_type"] == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(_TensorPlan(None, name, (head_dim // 2,)))
    for key, shape in checkpoint.shapes.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime from rope_theta
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        found = name_map.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            unknown.append(key)
            continue
        kind, name = found
        heads = 0
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            heads = config.num_attention_heads
        elif kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = config.num_key_value_heads or config.num_attention_heads
        plans.append(_TensorPlan(key, name, shape, heads))
    if unknown:
        raise UserError(
            f"El modelo de {checkpoint.folder} tiene tensores que la arquitectura llama de GGUF "
            f"no conoce: {', '.join(sorted(unknown)[:5])}. Solo se exportan modelos Llama estándar."
        )
    return plans


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else -1


def llama_order(plans: list[_TensorPlan]) -> list[_TensorPlan]:
    """Tensors in llama.cpp's order: non-layer tensors, then layer by layer, by name within each group.

    llama.cpp's model loader keeps its tensors in this order and llama-quantize writes them so; it also
    counts attn_v tensors in this order to decide which ones get more bits.
    """
    return sorted(plans, key=lambda p: (_layer_of(p.name), p.name))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's pick of layers that keep more bits in the _M types: the first and last eighth
    of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(plans: list[_TensorPlan], out: _OutType, n_layer: int, n_head: int = 0, n_head_kv: int = 0):
    """{tensor name: GGML type}, the type llama.cpp's `llama-quantize` gives each tensor for this file type.

    Mirrors llama_tensor_get_type for a dense Llama model without importance matrix:
    - 1-D tensors (norms, rope_freqs) stay F32;
    - the output matrix (token_embd when the embeddings are tied) goes to Q6_K, or to Q8_0 when its rows
      do not fill the default type's blocks;
    - in Q4_K_M and Q5_K_M, attn_v and ffn_down of the layers chosen by use_more_bits go to Q6_K
      (and the other attn_v to Q5_K on a 70B model);
    - a tensor whose rows (ne[0], the input size) are not a multiple of the block falls back as
      llama.cpp's tensor_type_fallback does: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, then F16 if even that
      does not divide. SmolLM2 (hidden 576 = 2.25×256) hits this: all matrices that read the hidden
      state fall back, only ffn_down (rows of 1536 = 6×256) is a K-quant.
    F16 and Q8_0 keep this project's earlier rule: every matrix in that type, F16 when rows do not fill
    32-value blocks (llama.cpp has no fallback for Q8_0 and refuses such a tensor).
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    fallback = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

    def fits(qtype, ncols: int) -> bool:
        return ncols % gguf.GGML_QUANT_SIZES[qtype][0] == 0

    ordered = llama_order(plans)
    tied = not any(p.name == "output.weight" for p in ordered)
    n_attention_wv = sum("attn_v.weight" in p.name for p in ordered)
    is_70b = n_layer == 80 and n_head != n_head_kv  # llama.cpp's LLM_TYPE_70B for the llama architecture
    i_attention_wv = i_ffn_down = 0
    types = {}
    for plan in ordered:
        ncols = plan.shape[-1]
        if len(plan.shape) < 2 or not plan.name.endswith("weight") or "_norm.weight" in plan.name:
            types[plan.name] = Q.F32
            continue
        if out.mix is None:
            types[plan.name] = out.tensor_type if fits(out.tensor_type, ncols) else Q.F16
            continue
        new = out.tensor_type
        if plan.name == "output.weight" or (tied and plan.name == "token_embd.weight"):
            new = Q.Q8_0 if not fits(out.tensor_type, ncols) else Q.Q6_K
        elif "attn_v.weight" in plan.name:
            if out.mix == "_m" and use_more_bits(i_attention_wv, n_attention_wv):
                new = Q.Q6_K
            elif is_70b and new == Q.Q4_K:
                new = Q.Q5_K
            i_attention_wv += 1
        elif "ffn_down" in plan.name:
            if out.mix == "_m" and use_more_bits(i_ffn_down, n_layer):
                new = Q.Q6_K
            i_ffn_down += 1
        if not fits(new, ncols):
            new = fallback.get(new, Q.F16)
            if not fits(new, ncols):
                new = Q.F16
        types[plan.name] = new
    return types


def _stored_nbytes(plan: _TensorPlan, qtype) -> tuple[tuple[int, ...], int]:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(plan.shape[:-1], dtype=np.int64)) if len(plan.shape) > 1 else 1
    nbytes = rows * (plan.shape[-1] // block) * type_size
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return plan.shape, nbytes
    return gguf.quant_shape_to_byte_shape(plan.shape, qtype), nbytes


def _tensor_data(plan: _TensorPlan, checkpoint: _Checkpoint, rope: dict[str, Any], head_dim: int,
                 qtype, permute: bool) -> np.ndarray:
    if plan.hf_key is None:
        data = llama3_rope_factors(rope, head_dim)
    else:
        data = checkpoint.get(plan.hf_key)
        if plan.permute_heads and permute:
            data = permute_qk(data, plan.permute_heads)
    return quantize(np.ascontiguousarray(data), qtype)


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """Quantize like llama.cpp's reference quantizer: K-quants here, the other types with `gguf`
    (whose Q4_0, Q5_0, Q5_1 and Q8_0 give the same bytes as ggml's; tests/test_kquants.py checks both)."""
    import gguf

    if qtype.name in kquants.BLOCK_BYTES:
        return kquants.quantize(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


# ---------------------------------------------------------------------------------------- tokenizer


def pre_tokenizer_name(tokenizer) -> str:
    """The llama.cpp pre-tokenizer (regex split) that reproduces this tokenizer.

    llama.cpp identifies it by name, not by reading tokenizer.json. Llama 3 uses its own split regex
    ("llama-bpe"). SmolLM2 splits digits one by one ("smollm"); its vocabulary has no token that joins
    a digit to anything, so even a copy whose tokenizer.json lost the digit split tokenizes the same.
    """
    vocab = tokenizer.get_vocab()
    if "<|begin_of_text|>" in vocab and "<|start_header_id|>" in vocab:
        return "llama-bpe"
    if vocab.get("<|im_start|>") == 1 and vocab.get("<repo_name>") == 3 and len(vocab) == 49152:
        return "smollm"
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps) and "ByteLevel" in kinds:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """Everything llama.cpp's "gpt2" (byte-level BPE) vocabulary needs, read from the HF tokenizer."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"El tokenizador es de tipo {model.get('type')!r}; la exportación GGUF solo admite BPE a nivel de byte."
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    too_big = []
    for token, idx in model["vocab"].items():
        if idx >= vocab_size:
            too_big.append(token)
            continue
        tokens[idx] = token
        types[idx] = int(gguf.TokenType.NORMAL)
    for added in backend.get("added_tokens", []):
        idx = added["id"]
        if idx >= vocab_size:
            too_big.append(added["content"])
            continue
        tokens[idx] = added["content"]
        types[idx] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if too_big:
        raise UserError(
            f"El tokenizador tiene {len(too_big)} tokens con id ≥ vocab_size={vocab_size} del modelo "
            f"(p. ej. {too_big[0]!r}): el vocabulario y la matriz de embeddings no encajan."
        )
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return {
        "pre": pre_tokenizer_name(tokenizer),
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "add_bos": bool(bos is not None and probe[:1] == [bos]),
        "add_eos": bool(eos is not None and len(probe) > 1 and probe[-1] == eos),
        "chat_template": template,
    }


def _add_tokenizer(writer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if vocab[key] is not None:
            add(int(vocab[key]))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    # Byte-level BPE never prepends a space; readers that default to True would strip one on decode.
    writer.add_add_space_prefix(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


# -------------------------------------------------------------------------------------------- write


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _check_llama(config, model_dir: Path) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise UserError(
            f"{model_dir / 'config.json'}: 'model_type' es {getattr(config, 'model_type', None)!r}; la "
            "exportación GGUF de este proyecto solo admite la arquitectura llama (Llama 3.x, SmolLM2)."
        )
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "llama3", "linear"):
        raise UserError(
            f"{model_dir / 'config.json'}: escalado rope '{rope_type}' no admitido en la exportación GGUF."
        )


def _add_model_metadata(writer, config, out: _OutType, rope: dict[str, Any], name: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(out.file_type))
    if out.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = _head_dim(config)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _write_file(path: Path, checkpoint: _Checkpoint, plans: list[_TensorPlan], config, vocab: dict[str, Any],
                out: _OutType, name: str, permute: bool = True) -> None:
    """Stream one GGUF file: tensor infos first, then each tensor converted and written in turn."""
    import gguf

    rope = rope_parameters(config)
    head_dim = _head_dim(config)
    writer = gguf.GGUFWriter(path, ARCH)
    _add_model_metadata(writer, config, out, rope, name)
    _add_tokenizer(writer, vocab)
    qtypes = []
    chosen = tensor_types(plans, out, int(config.num_hidden_layers), int(config.num_attention_heads),
                          int(config.num_key_value_heads or config.num_attention_heads))
    plans = llama_order(plans)
    for plan in plans:
        qtype = chosen[plan.name]
        shape, nbytes = _stored_nbytes(plan, qtype)
        tensor_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        writer.add_tensor_info(plan.name, shape, np.dtype(tensor_dtype.get(qtype, np.uint8)), nbytes,
                               raw_dtype=None if qtype in tensor_dtype else qtype)
        qtypes.append(qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # A q4_k_m file of a 1B model takes minutes in numpy: one line per tenth, so the cell never looks stuck.
    shown = 0
    started = time.perf_counter()
    for number, (plan, qtype) in enumerate(zip(plans, qtypes), start=1):
        writer.write_tensor_data(_tensor_data(plan, checkpoint, rope, head_dim, qtype, permute))
        if number * 10 // len(plans) > shown:
            shown = number * 10 // len(plans)
            print(f"  {number}/{len(plans)} tensores ({shown * 10} %), {time.perf_counter() - started:.0f} s",
                  flush=True)
    writer.close()
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def estimate_bytes(plans: list[_TensorPlan], out: _OutType, vocab: dict[str, Any], n_layer: int = 0) -> int:
    chosen = tensor_types(plans, out, n_layer)
    tensors = sum(_stored_nbytes(p, chosen[p.name])[1] for p in plans)
    metadata = sum(len(t) + 12 for t in vocab["tokens"]) + sum(len(m) + 8 for m in vocab["merges"])
    return int((tensors + metadata) * verify.SPACE_MARGIN)


# ------------------------------------------------------------------------------------------- export


def export_gguf(model_dir: str | Path, out_dir: str | Path, types: tuple[str, ...] | list[str] = ("f16", "q8_0"),
                *, verify: bool = True, name: str | None = None) -> list[dict[str, Any]]:
    """Write `model-<type>.gguf` for each type into `out_dir`; return one record per file for run.json.

    Each file is written under a temporary name, read back with transformers and compared with the
    merged model in `model_dir` (if `verify`), and only then renamed. Raises UserError on bad input,
    lack of disk space or a file that fails its check.
    """
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    known = _out_types()
    types = check_types(types)
    if not (model_dir / "config.json").exists():
        raise UserError(f"No existe {model_dir / 'config.json'}: ejecuta antes la fusión del adaptador.")
    config = AutoConfig.from_pretrained(model_dir)
    _check_llama(config, model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"No se puede leer el tokenizador de {model_dir}: {err}") from None
    checkpoint = _Checkpoint(model_dir)
    plans = _plan_tensors(checkpoint, config, rope_parameters(config))
    vocab = tokenizer_metadata(tokenizer, int(config.vocab_size))
    if not vocab["chat_template"]:
        raise UserError(
            f"El tokenizador de {model_dir} no tiene plantilla de chat: el GGUF no sabría dar formato a las preguntas."
        )
    layers = int(config.num_hidden_layers)
    ensure_free_space(out_dir, sum(estimate_bytes(plans, known[t], vocab, layers) for t in types),
                      "los ficheros GGUF")
    name = name or _default_name(config, model_dir)

    checker = GgufChecker(model_dir, tokenizer, config, vocab, rope_parameters(config), _head_dim(config)) \
        if verify else None
    results = []
    for out_type in types:
        started = time.perf_counter()
        path = out_dir / gguf_file_name(out_type)
        print(f"Escribiendo {path.name} ...", flush=True)
        with atomic.atomic_path(path) as tmp:
            _write_file(tmp, checkpoint, plans, config, vocab, known[out_type], name)
            write_seconds = time.perf_counter() - started
            if checker:
                print(f"  comprobando {path.name} (logits frente al modelo fusionado) ...", flush=True)
            verification = checker.check(tmp, path.name, known[out_type]) if checker else None
            size = tmp.stat().st_size
        results.append({
            "path": str(path),
            "type": out_type,
            "bytes": size,
            "seconds_write": round(write_seconds, 2),
            "seconds_verify": round(time.perf_counter() - started - write_seconds, 2),
            "verification": verification,
        })
    return results


def _default_name(config, model_dir: Path) -> str:
    source = getattr(config, "_name_or_path", "") or ""
    stem = Path(source).name if source and Path(source).name not in ("", ".") else model_dir.name
    return f"{stem}-afinar"
