"""What machine we are on: device, precision, Colab, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import asdict, dataclass

from afinar.core.errors import UserError

TRACKED_LIBRARIES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth",
    "unsloth_zoo", "gguf", "huggingface_hub", "safetensors", "tokenizers",
)


@dataclass
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    bf16: bool
    memory_gib: float | None
    capability: str | None
    colab: bool

    def as_dict(self) -> dict:
        return asdict(self)


def in_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def detect_device() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(
            kind="cuda",
            name=props.name,
            # The T4 (compute 7.5) has no bf16: training there must use fp16.
            bf16=bool(torch.cuda.is_bf16_supported()),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            colab=in_colab(),
        )
    return DeviceInfo(kind="cpu", name=platform.processor() or platform.machine(), bf16=False,
                      memory_gib=None, capability=None, colab=in_colab())


# Capability caps that make PyTorch (ATEN_CPU_CAPABILITY) or oneDNN (ONEDNN_MAX_CPU_ISA) ignore AVX-512 and AMX:
# under them bf16 is emulated again, however new the processor (the way to try an AVX2-only machine).
_ATEN_WITHOUT_BF16 = ("default", "avx2", "zvector", "sve256")
_ONEDNN_WITHOUT_BF16 = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni")


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMX or AVX-512 BF16: the CPU multiplies bf16 matrices natively, so a bf16 base is faster than fp32.

    False when ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA caps the kernels below those instructions.
    """
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() in _ATEN_WITHOUT_BF16:
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower() in _ONEDNN_WITHOUT_BF16:
        return False
    try:
        flags = open(cpuinfo, encoding="utf-8").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def precision_for(device: DeviceInfo, requested: str = "auto") -> str:
    """bf16 where the GPU has it, fp16 otherwise (T4); on CPU bf16 where the processor computes it
    natively (AMX / AVX-512 BF16), fp32 elsewhere, where bf16 is emulated and slower.
    """
    if requested != "auto":
        if requested == "bf16" and device.kind == "cpu" and not cpu_has_fast_bf16():
            raise UserError("--precision bf16 en CPU necesita un procesador con AMX o AVX-512 BF16; usa fp32.")
        if requested == "bf16" and device.kind == "cuda" and not device.bf16:
            raise UserError(f"La GPU {device.name} no tiene bf16 (p. ej. la T4): usa --precision fp16.")
        return requested
    if device.kind == "cpu":
        # Native bf16 (AMX) trains ~1.65x faster than fp32 here (bench/bench_cpu_train.py); the LoRA
        # weights and optimizer stay in fp32 either way, only the frozen base and the matmuls are bf16.
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "bf16" if device.bf16 else "fp16"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def unsloth_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None
