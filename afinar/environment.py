"""What machine we are on: device, precision, Colab, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import asdict, dataclass

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


def precision_for(device: DeviceInfo) -> str:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 where the GPU has it, fp16 otherwise (T4)."""
    if device.kind == "cpu":
        return "fp32"
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
