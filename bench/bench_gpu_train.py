"""GPU training speed of our 03 training path, on the same data as the anchors of ../shared/gpu/anchor_bench.py.

One configuration per process (Unsloth patches transformers globally). It builds the model and trains through
the functions 03_train_model.py calls (afinar.train.engine.plan, modeling.build, engine.compile_layers_,
training.train) and prints one RESULT line: real (non-pad) tokens/s after warm-up steps and peak GiB, like
the anchor script, so bench/run_gpu.sh can print them side by side with the anchors of the same call.

    python bench/bench_gpu_train.py NAME
Environment (all optional):
  ENGINE auto|compiled|eager|unsloth   LOAD4 1|0 (4-bit base, the seed's setting)   PRECISION bf16|fp16
  FP8 1|0 (default: the plan's, on for Hopper)   GC 1|0 (gradient checkpointing; default: the plan's)   LOSS auto|response_only   COMPILE 1|0   PACK 1|0   DEQUANT 1|0   OPEN_ROWS n   ATTN flex_attention|sdpa   BATCH (rows; default: the plan's)
  MEM_GIB (plan as if the card had this much memory, and cap this process to it with
  torch.cuda.set_per_process_memory_fraction)   EMULATE=t4 (plan as for a Colab T4: 14.7 GiB, capability 7.5,
  no bf16 so fp16, no FP8; memory capped likewise)   N_EX, WARM, STEPS, MODEL_DIR, OUT
  CURVE=1 records the loss of every step; PROFILE=1 profiles step WARM+1 and prints a breakdown by kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

NAME = sys.argv[1]
ENGINE = os.environ.get("ENGINE", "auto")
if ENGINE == "unsloth":
    import unsloth  # noqa: F401  (must precede transformers)

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afinar.train import engine, modeling, training
from afinar.core import settings  # noqa: E402
from afinar.core.environment import detect_device  # noqa: E402
from afinar.core.layout import OutputLayout  # noqa: E402

MODEL_DIR = os.environ.get("MODEL_DIR", "/tmp/llama32_1b_shape")
N_EX, WARM, STEPS = int(os.environ.get("N_EX", 2400)), int(os.environ.get("WARM", 5)), int(os.environ.get("STEPS", 30))
MAX_LEN = 2048


def entries(tokenizer) -> list[dict]:
    # The anchors' data: Alpaca-like lognormal lengths (median ~230 tokens) of random tokens, same generator.
    rng = random.Random(0)
    lens = [max(24, min(MAX_LEN - 64, int(rng.lognormvariate(5.45, 0.7)))) for _ in range(N_EX)]
    return [{"instruction": "Responde.", "output": tokenizer.decode([rng.randrange(200, 49000) for _ in range(n)])}
            for n in lens]


def categorize(name: str) -> str:
    n = name.lower()
    if "flex" in n or "attention" in n or "fmha" in n or "sdpa" in n:
        return "atención"
    if any(k in n for k in ("gemm", "cutlass", "sm90", "sm80", "cublas", "matmul", "_mm_", "nvjet", "splitk")):
        return "matmul"
    if any(k in n for k in ("logsumexp", "softmax", "gather", "scatter", "chunked", "logprob", "cross")):
        return "pérdida / softmax"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizador"
    if "triton" in n:
        return "triton fusionado (compilado)"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copias"
    return "elementwise / reducciones"


def start_profile():
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.__enter__()
    return prof


def profile_summary(prof) -> dict:
    """GPU time of one whole step (training_step, optimizer, callbacks, the next batch) by kind of kernel, and
    where the GPU sat idle: each gap between kernels with the CPU work that overlapped it (what it waited for)."""
    from torch.autograd import DeviceType

    torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    shares: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        t = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        shares[categorize(event.key)] = shares.get(categorize(event.key), 0.0) + t / 1000
        top.append((t / 1000, event.count, event.key[:90]))
    top.sort(reverse=True)
    total = sum(shares.values())
    for ms, count, key in top[:25]:
        print(f"  {ms:9.1f} ms  x{count:<5d} {key}")
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    span_start = min(e.time_range.start for e in cpu)
    span_end = max(e.time_range.end for e in cpu)
    gaps, busy, reach = [], 0.0, span_start
    for start, end in kernels + [(span_end, span_end)]:
        if start > reach:
            gaps.append((reach, start))
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    wall = (span_end - span_start) / 1000
    idle = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:15]:
        overlapping = sorted(((min(e.time_range.end, b) - max(e.time_range.start, a), e.name[:60]) for e in cpu
                              if e.time_range.start < b and e.time_range.end > a and
                              e.time_range.end - e.time_range.start < 4 * (b - a) + 1000), reverse=True)[:4]
        idle.append({"ms": round((b - a) / 1000, 2), "at_ms": round((a - span_start) / 1000, 1),
                     "cpu": [f"{name} ({t / 1000:.1f})" for t, name in overlapping]})
    idle_ms = sum(b - a for a, b in gaps) / 1000
    print(f"  paso completo: {wall:.1f} ms; GPU ocupada {busy / 1000:.1f} ms; "
          f"parada {idle_ms:.1f} ms en {len(gaps)} huecos", flush=True)
    for gap in idle:
        print(f"  hueco {gap['ms']:7.2f} ms a {gap['at_ms']:7.1f} ms: {'; '.join(gap['cpu'])}", flush=True)
    return {"gpu_ms": round(total, 1), "by_kind_ms": {k: round(v, 1) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "span_ms": round(wall, 1), "busy_ms": round(busy / 1000, 1), "idle_ms": round(idle_ms, 1),
            "gaps": len(gaps), "largest_gaps": idle}


def main() -> None:
    device = detect_device()
    if os.environ.get("EMULATE") == "t4":
        # What torch reports on a Colab T4. The kernels still run on this card (Triton compiles for its
        # architecture and shared memory): the plan and the memory are the T4's, the speed is not.
        device = dataclasses.replace(device, name=f"Tesla T4 (emulada en {device.name})", bf16=False,
                                     memory_gib=14.7, capability="7.5")
    memory = float(os.environ["MEM_GIB"]) if os.environ.get("MEM_GIB") else None
    cap = memory or (device.memory_gib if os.environ.get("EMULATE") else None)
    if cap:
        # Enforced, not only planned: the allocator refuses anything past the smaller card's memory.
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    resolved = {key: settings.default(key, "cuda") for key in settings.TRAIN_KEYS}
    resolved.update(model=MODEL_DIR, base_path=MODEL_DIR, backend="unsloth" if ENGINE == "unsloth" else "hf",
                    load_in_4bit=os.environ.get("LOAD4", "1") == "1", lora_r=16, lora_alpha=16, lora_dropout=0.0,
                    max_steps=STEPS, max_seq_length=MAX_LEN, save_steps=10**6, save_minutes=10**6,
                    logging_steps=10**6, warmup_ratio=0.0)
    if os.environ.get("BATCH"):
        resolved["batch_size"] = int(os.environ["BATCH"])
    if os.environ.get("FP8"):
        resolved["fp8"] = os.environ["FP8"] == "1"
    plan = engine.plan(resolved, device, ENGINE, memory_gib=memory)
    if os.environ.get("COMPILE"):
        plan.compile_layers = os.environ["COMPILE"] == "1"
    if os.environ.get("ATTN"):
        plan.attn_implementation = os.environ["ATTN"]
    if os.environ.get("PACK"):
        plan.packing = os.environ["PACK"] == "1"
    if os.environ.get("OPEN_ROWS"):
        plan.open_rows = int(os.environ["OPEN_ROWS"])
    if os.environ.get("GC"):
        plan.gradient_checkpointing = os.environ["GC"] == "1"
    if os.environ.get("DEQUANT"):
        plan.dequantize_4bit = os.environ["DEQUANT"] == "1" and resolved["load_in_4bit"]
    loss_impl = os.environ.get("LOSS", "auto")
    if loss_impl not in training.LOSS_IMPLS:
        sys.exit(f"LOSS={loss_impl}: must be one of {training.LOSS_IMPLS}")
    resolved.update(batch_size=plan.batch_size, packing=plan.packing)
    precision = os.environ.get("PRECISION") or plan.precision or ("bf16" if device.bf16 else "fp16")

    t0 = time.time()
    model, tokenizer = modeling.build(resolved, device, precision, plan=plan)
    data = entries(tokenizer)
    from afinar.stages.stage_train import probe_rows

    engine.prepare_model_(model, plan, probe_rows(data, tokenizer, MAX_LEN))
    print("plan:", plan.reasons, flush=True)
    load_s = time.time() - t0

    stamps: list[tuple[float, int]] = []
    losses: list[float] = []
    profiled: dict = {}
    running: list = []  # the profiler, while it records
    original_class = training._make_trainer_class

    class Stamp(TrainerCallback):
        # The anchors' clock (../shared/gpu/anchor_bench.py): wait for the GPU at the end of every optimizer step.
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            stamps.append((time.time(), self.trainer.real_tokens))

    def timed_class(*args, **kwargs):
        base = original_class(*args, **kwargs)

        class Timed(base):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Stamp(self))

            def training_step(self, *a, **k):
                # The profile covers one whole optimizer step: from this training_step to the next one.
                if os.environ.get("PROFILE") and len(stamps) == WARM and not profiled and not running:
                    running.append(start_profile())
                elif running and len(stamps) == WARM + 1:
                    profiled.update(profile_summary(running.pop()))
                out = super().training_step(*a, **k)
                if os.environ.get("CURVE"):
                    losses.append(round(float(out), 5))
                return out

        return Timed

    training._make_trainer_class = timed_class
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = training.train(model, tokenizer, data, layout=OutputLayout.at(tmp), settings=resolved,
                                 precision=precision, packing=plan.packing, loss_impl=loss_impl,
                                 fixed_length=plan.compile_layers, open_rows=plan.open_rows,
                                 gradient_checkpointing=plan.trainer_checkpointing,
                                 kernel_fallback=engine.kernel_fallback(model, plan))
    # The profiled step is slower (profiler overhead), and the next one starts with reading the profile:
    # time the steps after both.
    first = WARM + (2 if profiled else 0)
    (t_a, n_a), (t_b, n_b) = stamps[first - 1], stamps[-1]
    result = {"mode": "afinar_" + NAME, "engine": plan.engine, "load_in_4bit": resolved["load_in_4bit"],
              "dequantize_4bit": plan.dequantize_4bit, "fp8": plan.fp8_base, "fp8_drift": plan.fp8_drift,
              "compile": plan.compile_layers, "attn": plan.attn_implementation,
              "loss_impl": loss_impl, "open_rows": plan.open_rows, "checkpointing": plan.gradient_checkpointing, "precision": precision,
              "steps": len(stamps), "timed_steps": len(stamps) - first, "tok_per_s": round((n_b - n_a) / (t_b - t_a)),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "load_s": round(load_s, 1),
              "batch": plan.batch_size, "plan_memory_gib": memory or device.memory_gib, "memory_cap_gib": cap,
              "device": device.name, "reasons": plan.reasons,
              "final_loss": metrics["final_loss"], "losses": losses, "profile": profiled}
    print("RESULT", json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"afinar_{NAME}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
