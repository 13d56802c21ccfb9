"""Small facts about a loaded model that every group asks: the transformers model under PEFT, its device, and
how to give its GPU memory back.

torch is imported inside the functions: core modules are imported by the scripts' `--help`, which must stay fast.
"""

from __future__ import annotations


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model):
    """Where the model's weights are: its `device` attribute when it has one, else its first parameter's."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def free_gpu_memory() -> None:
    """Collect what Python still holds and return the CUDA cache, so the next model (or process) finds the room."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
