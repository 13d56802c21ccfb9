"""GPU training speed of our 03 training path, on the same data as the anchors of ../shared/gpu/anchor_bench.py.

One configuration per process (Unsloth patches transformers globally). Prints one RESULT line:
real (non-pad) tokens/s after warm-up steps and peak GiB, like the anchor script, so bench/run_gpu.sh can
print them side by side with the anchors measured in the same call.

    python bench/bench_gpu_train.py MODE   # MODE: unsloth | unsloth_pack | hf4_flex_pack | hf16_flex_pack
Environment: MODEL_DIR (default /tmp/llama32_1b_shape), N_EX, BATCH, WARM, STEPS, OUT.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

MODE = sys.argv[1]
if MODE.startswith("unsloth"):
    import unsloth  # noqa: F401  (must precede transformers)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afinar import modeling, settings, training  # noqa: E402
from afinar.environment import detect_device, precision_for  # noqa: E402
from afinar.layout import OutputLayout  # noqa: E402

MODEL_DIR = os.environ.get("MODEL_DIR", "/tmp/llama32_1b_shape")
N_EX, BATCH, WARM = int(os.environ.get("N_EX", 1600)), int(os.environ.get("BATCH", 8)), int(os.environ.get("WARM", 5))
STEPS = int(os.environ.get("STEPS", 40))
MAX_LEN = 2048


def entries(tokenizer) -> list[dict]:
    # The anchors' data: Alpaca-like lognormal lengths (median ~230 tokens) of random tokens.
    rng = random.Random(0)
    lens = [max(24, min(MAX_LEN - 64, int(rng.lognormvariate(5.45, 0.7)))) for _ in range(N_EX)]
    return [{"instruction": "Responde.", "output": tokenizer.decode([rng.randrange(200, 49000) for _ in range(n)])}
            for n in lens]


def main() -> None:
    device = detect_device()
    precision = precision_for(device)
    resolved = {key: settings.default(key, "cuda") for key in settings.TRAIN_KEYS}
    resolved.update(model=MODEL_DIR, base_path=MODEL_DIR, backend="unsloth" if MODE.startswith("unsloth") else "hf",
                    load_in_4bit="16" not in MODE, lora_r=16, lora_alpha=16, lora_dropout=0.0, max_steps=STEPS,
                    batch_size=BATCH, max_seq_length=MAX_LEN, save_steps=10**6, save_minutes=10**6,
                    logging_steps=10**6, attn_implementation="flex_attention" if "flex" in MODE else None)
    t0 = time.time()
    model, tokenizer = modeling.build(resolved, device, precision)
    load_s = time.time() - t0
    data = entries(tokenizer)

    stamps: list[tuple[float, int]] = []
    original_class = training._make_trainer_class

    def timed_class():
        base = original_class()

        class Timed(base):
            def training_step(self, *args, **kwargs):
                out = super().training_step(*args, **kwargs)
                torch.cuda.synchronize()
                stamps.append((time.time(), self.real_tokens))
                return out

        return Timed

    training._make_trainer_class = timed_class
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = training.train(model, tokenizer, data, layout=OutputLayout.at(tmp), settings=resolved,
                                 precision=precision, packing="pack" in MODE)
    (t_a, n_a), (t_b, n_b) = stamps[WARM - 1], stamps[-1]
    result = {"mode": "afinar_" + MODE, "steps": len(stamps), "tok_per_s": round((n_b - n_a) / (t_b - t_a)),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "load_s": round(load_s, 1),
              "batch": BATCH, "final_loss": metrics["final_loss"], "fused_lm_head": metrics["fused_lm_head"]}
    print("RESULT", json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"afinar_{MODE}_b{BATCH}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
