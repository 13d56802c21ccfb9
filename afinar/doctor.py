"""Plain summary of the environment, printed at the end of 01_setup.sh. Exit 1 if something is broken."""

from __future__ import annotations

import sys

from .environment import detect_device, library_versions, precision_for


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
        if bnb.startswith("FALLA"):
            problems.append("bitsandbytes no funciona con esta CUDA: reinstala bitsandbytes==0.50.2 o usa "
                            "--no-load-in-4bit en la etapa 02.")
        if uns.startswith("FALLA"):
            problems.append("Unsloth no se importa: usa --backend hf en las etapas 02-04 o reinstala requirements-gpu.txt.")
    else:
        from . import embedded

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
