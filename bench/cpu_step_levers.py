"""One CPU training step of the embedded model under the levers of issue 14, measured apart from the pipeline.

    python bench/cpu_step_levers.py steps      # LoRA on every layer, the top 8, the top 4 (4 rows of 640, fwd+bwd)
    python bench/cpu_step_levers.py cached 4   # top 4 with the stored frozen prefix: first visit, later visits,
                                               # and a torch.profiler table of a later visit
    python bench/cpu_step_levers.py int8 4     # the frozen layers below the top 4 in int8 (dynamic, per channel)
                                               # against fp32: seconds and relative error of the hidden state

Random token ids (the speed does not depend on them), labels on the last 460 positions of each row as in a
typical packed row of tu_dataset.json. Time it with nothing else on the CPU.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model():
    import torch
    from transformers import AutoModelForCausalLM

    from afinar.core import embedded

    return AutoModelForCausalLM.from_pretrained(str(embedded.ensure_checkpoint(verbose=False)), dtype=torch.float32)


def _lora(model, top: int | None):
    from peft import LoraConfig, get_peft_model

    from afinar.core.settings import LORA_TARGET_MODULES

    total = model.config.num_hidden_layers
    layers = None if top is None else list(range(total - top, total))
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGET_MODULES,
                                            layers_to_transform=layers, task_type="CAUSAL_LM"))


def _batch():
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 49000, (4, 640))
    labels = ids.clone()
    labels[:, :180] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(640).repeat(4, 1)}


def _step(model, batch, row_lengths=None) -> float:
    from afinar.train.training import response_only_loss

    started = time.perf_counter()
    response_only_loss(model, batch, row_lengths=row_lengths).backward()
    model.zero_grad(set_to_none=True)
    return round(time.perf_counter() - started, 2)


def steps() -> None:
    import torch

    batch = _batch()
    for top in (None, 8, 4):
        model = _lora(_model(), top).train()
        print(f"LoRA en {'todas las capas' if top is None else f'las {top} de arriba'}: "
              f"{[_step(model, batch) for _ in range(3)]} s por paso", flush=True)
    base = _model().eval()
    with torch.no_grad():
        started = time.perf_counter()
        hidden = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        forward = time.perf_counter() - started
        started = time.perf_counter()
        base.lm_head(hidden[batch["labels"] != -100])
        head = time.perf_counter() - started
    print(f"ida sin gradiente del modelo entero {forward:.2f} s; cabeza LM sobre las posiciones de respuesta {head:.2f} s")


def cached(top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from afinar.train import frozen_prefix

    model = _lora(_model(), top).train()
    batch = _batch()
    frozen_prefix.attach(model)
    lengths = [640] * 4
    print(f"primera visita {_step(model, batch, lengths)} s; siguientes "
          f"{[_step(model, batch, lengths) for _ in range(2)]} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, batch, lengths)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def int8(top: int) -> None:
    import torch
    import torch.nn as nn

    from afinar.train.frozen_prefix import _only_layers

    model = _model().eval()
    start = model.config.num_hidden_layers - top
    quantized = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(nn.ModuleList(list(model.model.layers)[:start])),
        {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    batch = _batch()

    def lower(layers):
        with torch.no_grad(), _only_layers(model.model, slice(0, start), final_norm=False):
            if layers is not None:
                model.model.layers = layers
            return model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state

    for _ in range(2):
        started = time.perf_counter()
        reference = lower(None)
        fp32 = time.perf_counter() - started
        started = time.perf_counter()
        approx = lower(quantized)
        q8 = time.perf_counter() - started
        error = float((approx - reference).norm() / reference.norm())
        print(f"capas 0-{start - 1}: fp32 {fp32:.2f} s, int8 {q8:.2f} s ({fp32 / q8:.2f}×); error relativo {error:.3f}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "steps"
    if mode == "steps":
        steps()
    elif mode == "cached":
        cached(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    elif mode == "int8":
        int8(int(sys.argv[2]) if len(sys.argv) > 2 else 4)
    else:
        raise SystemExit(f"modo desconocido: {mode} (steps, cached o int8)")
