"""Merge a LoRA adapter into its base model in 16 bits, and prove the merge by comparing logits.

The deltas go onto the original base weights, never onto the 4-bit copy used in training when the
original exists: merging onto nf4 weights bakes the quantisation error into every 16-bit weight.
Each merge is checked against the unmerged PEFT model in fp32 before it replaces the output folder.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from afinar.core import atomic, settings
from afinar.core.errors import UserError
from afinar.core.models import free_gpu_memory
from afinar.data.data_check import spanish_json_error
from afinar.export import verify

DTYPES = ("bfloat16", "float16", "float32")

# Bounds on max|Δlogit| / std(reference logits). The merged file is read back in fp32, so the only
# expected difference is the rounding of each stored weight: bf16 keeps 8 significant bits, fp16 keeps
# 11. Measured on the embedded model (311 positions × 49152 logits, random r=16 adapter): bf16 0.058,
# fp16 0.0094, fp32 1.7e-5 (the base alone stored in bf16 gives 0.054, so this is pure storage noise).
# A merge with the adapter scaled by 0.9 instead of 1 gives 0.51 and a missing adapter 3.3, so the
# bounds keep a 2.5x margin over the noise and stay well below a real mistake.
DEFAULT_TOLERANCE = {"bfloat16": 0.15, "float16": 0.03, "float32": 2e-4}
# Greedy next-token agreement over every prompt position: 16-bit rounding may flip near-ties only
# (measured 96.8% bf16, 98.7% fp16, 100% fp32; the 0.9-scaled adapter gives 92%, a missing one 59%).
MIN_TOP1_AGREEMENT = {"bfloat16": 0.90, "float16": 0.95, "float32": 0.99}

BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}

_BNB_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


# --------------------------------------------------------------------------------------------- checks


def detect_base_weights(base_path: str | Path) -> str:
    """'original' when the base holds 16/32-bit weights, 'dequantized_4bit' when only nf4/fp4 exist.

    The config says it (a bitsandbytes quantization_config with load_in_4bit); the safetensors headers
    say it too (packed uint8 weights with their absmax companions), which catches a config edited by hand.
    """
    base_path = Path(base_path)
    config = _read_json(base_path / "config.json", "la configuración del modelo base")
    quant = config.get("quantization_config") or {}
    if quant:
        method = str(quant.get("quant_method", "bitsandbytes"))
        if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
            raise UserError(
                f"{base_path / 'config.json'}: el campo 'quantization_config' indica pesos de 8 bits "
                "(load_in_8bit). Solo se puede fusionar sobre los pesos originales o sobre pesos nf4/fp4 "
                "de 4 bits: usa el modelo base original en 16 bits."
            )
        if method == "bitsandbytes" and (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
            return "dequantized_4bit"
        if method != "bitsandbytes":
            raise UserError(
                f"{base_path / 'config.json'}: 'quantization_config.quant_method' es '{method}', que no se "
                "sabe descuantizar. Usa el modelo base original en 16 bits."
            )
    if _has_packed_4bit_tensors(base_path):
        return "dequantized_4bit"
    return "original"


def _has_packed_4bit_tensors(base_path: Path) -> bool:
    from safetensors import safe_open

    for file in sorted(base_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(_BNB_AUX_SUFFIXES) or ".quant_state.bitsandbytes__" in key:
                    return True
    return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"No existe {path} ({what}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} no es un JSON válido ({spanish_json_error(err)}, línea {err.lineno}).") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} no es un JSON válido: no está en UTF-8 (byte {err.start}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} debería contener un objeto JSON.")
    return data


def _check_adapter(adapter_path: Path) -> dict[str, Any]:
    config = _read_json(adapter_path / "adapter_config.json", "la configuración del adaptador LoRA")
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{adapter_path / 'adapter_config.json'}: el campo 'peft_type' es {config.get('peft_type')!r}; "
            "solo se fusionan adaptadores LoRA."
        )
    weights = [adapter_path / "adapter_model.safetensors", adapter_path / "adapter_model.bin"]
    if not any(w.exists() for w in weights):
        raise UserError(f"Falta {weights[0]}: el adaptador está incompleto; vuelve a ejecutar la etapa 03.")
    return config


def _check_base(base_path: Path) -> None:
    if not (base_path / "config.json").exists():
        raise UserError(f"No existe {base_path / 'config.json'}: {base_path} no es un modelo base válido.")
    if not any(base_path.glob("*.safetensors")) and not any(base_path.glob("*.bin")):
        raise UserError(f"No hay pesos (*.safetensors) en {base_path}.")


def count_parameters(config) -> int:
    """Parameters of the plain (unquantised) model, tied ones counted once, without allocating memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _plain_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- merge


def merge_adapter(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = settings.common_default("merge_dtype"),
    prompts: Iterable[str] | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Merge `adapter_path` into `base_path` and write a plain checkpoint to `out_dir`, atomically.

    `tolerance` bounds max|Δlogit| / std(reference logits) between the merged model read back from disk
    and base + adapter unmerged in fp32 (defaults in DEFAULT_TOLERANCE). Past it, or with greedy
    next-token agreement under MIN_TOP1_AGREEMENT, a UserError is raised and `out_dir` is left as it was.
    Returns the record for run.json.
    """
    import torch
    from transformers import AutoConfig

    started = time.perf_counter()
    base_path, adapter_path, out_dir = Path(base_path), Path(adapter_path), Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"Tipo de datos '{dtype}' no admitido para la fusión; elige uno de: {', '.join(DTYPES)}.")
    target_dtype = getattr(torch, dtype)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    min_top1 = MIN_TOP1_AGREEMENT[dtype]

    _check_base(base_path)
    _check_adapter(adapter_path)
    merged_onto = detect_base_weights(base_path)
    config = AutoConfig.from_pretrained(base_path)
    n_params = count_parameters(config)
    tokenizer = _load_tokenizer(adapter_path, base_path)
    needed = int(n_params * BYTES_PER_PARAM[dtype] * verify.SPACE_MARGIN) + _tokenizer_bytes(tokenizer)
    verify.ensure_free_space(out_dir.parent, needed, "el modelo fusionado")

    warning = None
    if merged_onto == "dequantized_4bit":
        warning = (
            f"El modelo base {base_path} solo tiene pesos de 4 bits (bitsandbytes): el adaptador se fusiona "
            "sobre sus valores descuantizados, que arrastran el error de cuantización. Para una fusión "
            "exacta, usa el modelo base original en 16 bits."
        )
        warnings.warn(warning, UserWarning, stacklevel=2)
        base = _load_dequantized_base(base_path)
    else:
        _progress(started, f"cargando la base en 16 bits ({n_params / 1e6:.0f} M parámetros)")
        base = _load_original_base(base_path)

    _progress(started, "aplicando el adaptador y calculando los logits de referencia")
    peft_model = _attach_adapter(base, adapter_path)
    inputs = verify.verification_inputs(tokenizer, prompts)
    reference = verify.compute_logits(peft_model, inputs)

    # PEFT adds scale·B@A to each fp32 weight in place; the one cast to 16 bits comes after.
    _progress(started, "sumando los pesos LoRA a la base")
    merged = peft_model.merge_and_unload(safe_merge=True)
    del peft_model
    merged = merged.to(target_dtype)
    merged.config.dtype = target_dtype
    generation_config = _generation_config(base_path, merged.config, tokenizer)
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))

    with atomic.atomic_dir(out_dir) as tmp:
        _progress(started, f"guardando {out_dir.name} (safetensors)")
        _write_merged(merged, tokenizer, generation_config, tmp)
        del merged
        _progress(started, "comprobando que el modelo guardado responde como base + adaptador")
        verification = _verify_saved(tmp, inputs, reference, tied, dtype)
        verification.update({"tolerance": tolerance, "min_top1_agreement": min_top1})
        _judge(verification, out_dir)
        written = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())

    return {
        "path": str(out_dir),
        "dtype": dtype,
        "merged_onto": merged_onto,
        "warning": warning,
        "base_path": str(base_path),
        "adapter_path": str(adapter_path),
        "parameters": n_params,
        "bytes": written,
        "tied_embeddings": tied,
        "verification": verification,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _progress(started: float, what: str) -> None:
    """One line per phase: merging a 1B model takes minutes, and a silent cell looks stuck."""
    print(f"  fusión: {what} ... ({time.perf_counter() - started:.0f} s)", flush=True)


def _plain_config(config):
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _load_tokenizer(adapter_path: Path, base_path: Path):
    """The adapter's tokenizer when stage 03 saved one (it may carry the pad token and template)."""
    from transformers import AutoTokenizer

    source = adapter_path if (adapter_path / "tokenizer_config.json").exists() else base_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"No se puede leer el tokenizador de {source}: {err}") from None


def _tokenizer_bytes(tokenizer) -> int:
    path = Path(getattr(tokenizer, "name_or_path", "") or "") / "tokenizer.json"
    return path.stat().st_size * 2 if path.exists() else 50 * 2**20


def _load_original_base(base_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.eval()
    return model


def _load_dequantized_base(base_path: Path):
    """Rebuild a plain fp32 model from a bitsandbytes 4-bit checkpoint (needs bitsandbytes, usually a GPU)."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit
    except ImportError:
        raise UserError(
            f"El modelo base {base_path} solo tiene pesos de 4 bits y para descuantizarlos hace falta el "
            "paquete bitsandbytes (con GPU). Instálalo o, mejor, usa el modelo base original en 16 bits."
        ) from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, device_map={"": device})
    state: dict[str, Any] = {}
    packed = set()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            state[f"{name}.weight"] = dequantize_4bit(weight.data, weight.quant_state).float().cpu()
            packed.add(f"{name}.weight")
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float().cpu()
    for name, param in quantized.named_parameters():
        if name not in packed and name not in state:
            state[name] = param.detach().float().cpu()
    config = _plain_config(AutoConfig.from_pretrained(base_path))
    del quantized
    free_gpu_memory()

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied_head or unexpected:
        raise RuntimeError(f"Descuantización incompleta: faltan {sorted(missing)}, sobran {sorted(unexpected)}")
    model.tie_weights()
    model.eval()
    return model


def _attach_adapter(base, adapter_path: Path):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter_path), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(
            f"El adaptador {adapter_path} no encaja con el modelo base ({err}). Comprueba que se entrenó "
            "sobre ese mismo modelo."
        ) from None
    model.eval()
    return model


def _generation_config(base_path: Path, model_config, tokenizer):
    """The base's generation settings, stopping on the tokenizer's end-of-turn and padding with its pad."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_path)
    except OSError:
        generation = GenerationConfig.from_model_config(model_config)
    eos = tokenizer.eos_token_id
    if eos is not None:
        existing = generation.eos_token_id
        existing = [] if existing is None else ([existing] if isinstance(existing, int) else list(existing))
        merged_eos = [eos] + [e for e in existing if e != eos]
        generation.eos_token_id = merged_eos[0] if len(merged_eos) == 1 else merged_eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generation.pad_token_id = pad
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    model_config.pad_token_id = pad
    return generation


def _write_merged(model, tokenizer, generation_config, folder: Path) -> None:
    model.generation_config = generation_config
    model.save_pretrained(folder)  # transformers 5 writes safetensors only
    generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # also writes chat_template.jinja


def _verify_saved(folder: Path, inputs, reference, tied: bool, dtype: str) -> dict[str, Any]:
    """Read the folder back the way any user would (plain transformers) and compare with the reference."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = sorted(folder.glob("*.safetensors"))
    if not files or any(folder.glob("*.bin")):
        raise UserError(f"La fusión en {folder} no produjo pesos safetensors.")
    stored_dtypes = set()
    keys: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                keys.append(key)
                stored_dtypes.add(str(handle.get_slice(key).get_dtype()))
    leftovers = [k for k in keys if "lora_" in k or "base_model.model" in k]
    if leftovers:
        raise UserError(f"La fusión dejó tensores del adaptador en el modelo: {leftovers[:3]}")

    # Upcast on load: what is measured is the stored weights, not bf16 arithmetic on this CPU.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tied_ok = True
    if tied:
        tied_ok = (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            and "lm_head.weight" not in keys
        )
    result = verify.compare_logits(reference, verify.compute_logits(model, inputs))
    result.update({"stored_dtypes": sorted(stored_dtypes), "tied_embeddings_kept": tied_ok, "prompts": len(inputs)})
    return result


def _judge(verification: dict[str, Any], out_dir: Path) -> None:
    problems = []
    if not verification["tied_embeddings_kept"]:
        problems.append("lm_head ya no comparte pesos con embed_tokens")
    if not verification["relative_max_diff"] <= verification["tolerance"]:
        problems.append(
            f"diferencia máxima de logits {verification['max_abs_logit_diff']:.4g} = "
            f"{verification['relative_max_diff']:.3g} × desviación típica ({verification['logit_std']:.3g}), "
            f"por encima de la tolerancia {verification['tolerance']:.3g}"
        )
    if verification["top1_agreement"] < verification["min_top1_agreement"]:
        problems.append(
            f"el token más probable coincide solo en el {verification['top1_agreement']:.1%} de las posiciones "
            f"(mínimo {verification['min_top1_agreement']:.0%})"
        )
    if problems:
        raise UserError(
            f"La fusión no reproduce el modelo base + adaptador ({'; '.join(problems)}). No se ha escrito "
            f"{out_dir}. Revisa que el adaptador corresponda a ese modelo base."
        )
