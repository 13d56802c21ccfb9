"""Plain summary of the environment, printed at the end of 01_setup.sh. Exit 1 if something is broken."""

from __future__ import annotations

import sys

from afinar.core import embedded
from afinar.core.environment import detect_device, library_versions, precision_for


def _check_bitsandbytes() -> str:
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float16, quant_type="nf4").cuda()
        layer(torch.randn(2, 64, device="cuda", dtype=torch.float16))
        return "ok (una capa nf4 funciona en la GPU)"
    except Exception as err:  # any failure here means the same thing to the user
        return f"FALLA: {type(err).__name__}: {str(err)[:200]}"


def _check_unsloth() -> str:
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel  # noqa: F401

        return "ok"
    except Exception as err:
        return f"FALLA: {type(err).__name__}: {str(err)[:200]}"


def xformers_status(device_kind: str) -> str:
    """Whether xformers is needed and, if present, whether its kernel runs with this torch and driver.

    It is not installed on purpose: on a 16 GB T4 stage 03 trains with the compiled engine (flex attention,
    SDPA where flex cannot run), which does not call xformers. Unsloth, kept for cards under 14 GiB, calls
    xformers when it is there and PyTorch's SDPA otherwise. A wheel built for another torch would also try to
    replace the installed torch.
    """
    try:
        import xformers
    except ImportError:
        if device_kind != "cuda":
            return "no instalado (no aplica en CPU)"
        return ("no instalado, y no hace falta: en una T4 la etapa 03 usa el motor compilado (atención flex, o "
                "SDPA si flex no corre); Unsloth, solo en tarjetas de menos de 14 GiB, usa SDPA sin xformers")
    version = getattr(xformers, "__version__", "?")
    if device_kind != "cuda":
        return f"{version} (sin uso en CPU)"
    try:
        import torch
        from xformers.ops import memory_efficient_attention

        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        return f"{version}, ok (un núcleo de atención funciona en la GPU; solo lo usa Unsloth)"
    except Exception as err:
        return f"{version}, FALLA: {type(err).__name__}: {str(err)[:160]} (no se usa: la etapa 03 no lo necesita)"


def torch_build() -> str:
    """Which torch wheel is installed: the CPU build, or one with CUDA (GBs of libraries a CPU never uses)."""
    try:
        import torch
    except ImportError:
        return "no instalado"
    cuda = getattr(torch.version, "cuda", None)
    if cuda:
        usable = "y la GPU la ve" if torch.cuda.is_available() else "pero no hay GPU: sobran varios GB"
        return f"con CUDA {cuda} ({usable})"
    return "para CPU (sin CUDA)"


def main() -> int:
    device = detect_device()
    versions = library_versions()
    problems = []
    print("\n== Resumen del entorno")
    print(f"  dispositivo: {device.kind} ({device.name})" + (f", {device.memory_gib} GiB" if device.memory_gib else ""))
    print(f"  precisión de entrenamiento: {precision_for(device)}   Colab: {'sí' if device.colab else 'no'}")
    print(f"  compilación de torch: {torch_build()}")
    for name in ("python", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "gguf",
                 "huggingface_hub", "bitsandbytes", "unsloth"):
        print(f"  {name:16s} {versions.get(name, '-')}")
    if device.kind == "cuda":
        bnb = _check_bitsandbytes()
        uns = _check_unsloth()
        print(f"  bitsandbytes con el controlador: {bnb}")
        print(f"  Unsloth: {uns}")
        print(f"  xformers: {xformers_status(device.kind)}")
        if bnb.startswith("FALLA"):
            problems.append("bitsandbytes no funciona con esta CUDA: reinstala bitsandbytes==0.50.2 o usa "
                            "--no-load-in-4bit en la etapa 02.")
        if uns.startswith("FALLA"):
            problems.append("Unsloth no se importa: usa --backend hf en las etapas 02-04 o reinstala requirements-gpu.txt.")
    else:
        print(f"  xformers: {xformers_status(device.kind)}")
        ready = embedded._is_complete(embedded.checkpoint_dir())
        print(f"  modelo integrado: {'listo en ' + str(embedded.checkpoint_dir()) if ready else 'NO preparado'}")
        if not ready:
            problems.append("El modelo integrado no está preparado: vuelve a ejecutar bash 01_setup.sh.")
    if problems:
        print("\nProblemas:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nTodo listo. Siguiente paso: python 02_load_model.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
