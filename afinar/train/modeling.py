"""Loading the base model and its LoRA adapter, through Unsloth (GPU) or transformers + PEFT (CPU/GPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from afinar.core import atomic, embedded
from afinar.core.environment import DeviceInfo, unsloth_available
from afinar.core.errors import UserError
from afinar.core.prompts import ensure_pad_token
from afinar.core.settings import LORA_TARGET_MODULES
from afinar.train.engine import dequantize_4bit_


def resolve_model(name: str) -> tuple[str, str]:
    """Map --model to (display name, loadable path or hub id).

    Local folders are used as they are; hub ids must already be in the local cache when offline.
    """
    if name == embedded.EMBEDDED_ALIAS:
        return embedded.ORIGINAL_HUB_ID, str(embedded.ensure_checkpoint())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"La carpeta {path} no contiene config.json: no es un modelo de transformers.")
        return name, str(path.resolve())
    if path.is_absolute() or name.startswith((".", "~")) or name.endswith("/") or name.startswith("/"):
        # Written as a path (/datos/modelo, ./modelo, ~/modelo): a Hub id never looks like this, so the
        # right message is that the folder does not exist, not a connection problem.
        raise UserError(f"--model {name}: la carpeta {path} no existe. Comprueba la ruta, o usa un identificador "
                        f"del Hub (usuario/modelo) o el modelo integrado '{embedded.EMBEDDED_ALIAS}'.")
    if name.count("/") != 1:
        raise UserError(
            f"--model {name}: no es una carpeta local ni un identificador del Hub (usuario/modelo), "
            f"ni el modelo integrado '{embedded.EMBEDDED_ALIAS}'."
        )
    from huggingface_hub import snapshot_download

    try:
        # Offline first: a model already in the cache must never trigger a download attempt.
        local = snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
        return name, local
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"El modelo {name} no está en la caché local y HF_HUB_OFFLINE=1 impide descargarlo. "
            f"Descárgalo en una máquina con red (huggingface-cli download {name} --local-dir MI_CARPETA), "
            f"cópialo aquí y pasa --model MI_CARPETA; o usa --model {embedded.EMBEDDED_ALIAS}."
        )
    try:
        return name, snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as err:  # network errors come in many types; the message is what matters
        raise UserError(
            f"No se pudo descargar {name} ({type(err).__name__}). Comprueba la conexión o el nombre, o "
            f"descárgalo en otra máquina y pasa --model CARPETA_LOCAL."
        ) from None


def resolve_backend(requested: str, device: DeviceInfo) -> str:
    if requested == "unsloth":
        if device.kind != "cuda":
            raise UserError(
                "--backend unsloth necesita una GPU con CUDA y aquí no hay ninguna. Usa --backend hf "
                "(transformers + PEFT, funciona en CPU) o ejecuta en una máquina con GPU."
            )
        if not unsloth_available():
            raise UserError("Unsloth no está instalado. Ejecuta bash 01_setup.sh o usa --backend hf.")
        return "unsloth"
    if requested == "hf":
        return "hf"
    return "unsloth" if device.kind == "cuda" and unsloth_available() else "hf"


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_base(path: str, *, backend: str, load_in_4bit: bool, precision: str, max_seq_length: int,
              attn_implementation: str | None = None, dequantize_4bit: bool = False):
    """Return (model, tokenizer) for the base model, without adapter."""
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must be imported before transformers patches are applied)
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=max_seq_length, dtype=_torch_dtype(precision),
            load_in_4bit=load_in_4bit, trust_remote_code=False,
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"dtype": _torch_dtype(precision), "trust_remote_code": False}
        if attn_implementation:
            # flex_attention turns packed rows into sparse document masks; SDPA would compute dense ones.
            kwargs["attn_implementation"] = attn_implementation
        if load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=_torch_dtype(precision),
            )
            import torch

            # Under torchrun each rank has already picked its own GPU (afinar.core.distributed.barrier).
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if load_in_4bit and dequantize_4bit:
            dequantize_4bit_(model, _torch_dtype(precision))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if not load_in_4bit:
            import torch

            if torch.cuda.is_available():
                model = model.to("cuda")
    ensure_pad_token(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.chat_template is None:
        raise UserError(f"El tokenizador de {path} no tiene plantilla de chat: usa un modelo *-Instruct.")
    return model, tokenizer


def lora_layer_indices(model, lora_layers: int | None) -> list[int] | None:
    """The top `lora_layers` decoder layers (None = all). Gradients then stop at the lowest adapted layer: the
    frozen layers below run their forward only, which is most of the saving on a CPU (afinar.core.settings)."""
    if not lora_layers:
        return None
    total = int(model.config.num_hidden_layers)
    if not 1 <= lora_layers <= total:
        raise UserError(f"--lora-layers {lora_layers}: el modelo tiene {total} capas; usa un número entre 1 y {total}.")
    return list(range(total - lora_layers, total)) if lora_layers < total else None


def add_lora(model, *, backend: str, lora_r: int, lora_alpha: int, lora_dropout: float, seed: int,
             gradient_checkpointing: bool = False, lora_layers: int | None = None):
    layers = lora_layer_indices(model, lora_layers)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGET_MODULES,
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed, layers_to_transform=layers,
        )
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the LoRA A matrices are random: same seed, same starting adapter
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGET_MODULES,
        bias="none", task_type="CAUSAL_LM", layers_to_transform=layers,
    )
    return get_peft_model(model, config)


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Put saved adapter weights into a freshly built PEFT model of the same shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights_file.exists():
        raise UserError(f"No se encuentra {weights_file}: falta el adaptador de una etapa anterior.")
    result = set_peft_model_state_dict(peft_model, load_file(str(weights_file)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"El adaptador {adapter_dir} no corresponde a este modelo (claves inesperadas: {unexpected[:3]}).")


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))


def build(settings: dict[str, Any], device: DeviceInfo, precision: str, adapter_dir: Path | None = None,
          gradient_checkpointing: bool = False, plan=None):
    """Base + LoRA exactly as stage 02 defined them, optionally with saved adapter weights loaded.

    `plan` (afinar.train.engine.Plan) is stage 03's choice of engine: it may load through another backend than
    stage 02 did (the adapter file is the same PEFT format), with flex attention and a dequantized base.
    """
    backend = plan.backend if plan else settings["backend"]
    model, tokenizer = load_base(
        settings["base_path"], backend=backend, load_in_4bit=settings["load_in_4bit"],
        precision=precision, max_seq_length=settings["max_seq_length"],
        attn_implementation=plan.attn_implementation if plan else settings.get("attn_implementation"),
        dequantize_4bit=bool(plan and plan.dequantize_4bit),
    )
    if plan:
        # The compiled engine's checkpointing comes from the Trainer alone (SFTConfig), as in every measured
        # run; preparing it here as well would also hook the embeddings' output.
        gradient_checkpointing = plan.gradient_checkpointing and plan.engine != "compiled"
    model = add_lora(
        model, backend=backend, lora_r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"], seed=settings["seed"], gradient_checkpointing=gradient_checkpointing,
        lora_layers=settings.get("lora_layers"),
    )
    if adapter_dir is not None:
        load_adapter_weights(model, adapter_dir)
    return model, tokenizer


def save_adapter(peft_model, tokenizer, target: Path, base_model_name: str) -> None:
    """Safetensors only, into a temp folder swapped in whole."""
    with atomic.atomic_dir(target) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # Record the public name, not a cache path of this machine, so the adapter is portable.
        config["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def ensure_base_path(run_manifest: dict[str, Any]) -> str:
    """The recorded base model's folder, fetched again if it is gone; updates run_manifest in memory.

    run.json keeps the folder the base was loaded from: a cache path (the Hub's, or the embedded model's).
    A Colab reset wipes those caches and keeps the output on Drive, so a later stage would find a run.json
    pointing at nothing. The public name is recorded too, so the same weights are brought back from it.
    """
    recorded = run_manifest["settings"]["base_path"]
    if (Path(recorded) / "config.json").is_file():
        return recorded
    name = run_manifest["model"]["base_model"]
    if name == embedded.ORIGINAL_HUB_ID and Path(recorded).name == embedded.checkpoint_dir().name:
        name = embedded.EMBEDDED_ALIAS  # the embedded copy, converted again from its package
    print(f"El modelo base ya no está en {recorded} (¿se reinició el entorno?): se vuelve a obtener {name} ...",
          flush=True)
    _, path = resolve_model(name)
    run_manifest["settings"]["base_path"] = path
    run_manifest["model"]["base_path"] = path
    return path
