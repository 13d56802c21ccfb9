"""CPU training speed: our 03 training path against the plain-TRL anchor, measured in the same run.

Anchor: TRL's SFTTrainer as a user would write it (SmolLM2-135M, LoRA r=16 on the 7 projections, fp32,
padded batch 4, prompt-completion data with completion-only loss). TRL 1.15.0, which the project pins for
Unsloth, cannot train on CPU, so the anchor runs TRL 1.16.0 from a private folder (installed on demand).
Ours: afinar.train.training.train with the project's CPU defaults, as stage 03 runs it (LoRA on the top layers
with the frozen layers below stored per row, afinar.train.frozen_prefix). Same seed and number of steps; real
(non-pad) tokens per second after warm-up steps.

The demo trains several epochs over the same rows, and the stored prefix only pays from the second visit of a
row, so our path trains on the first --project-entries entries, cycled: with 40 entries an epoch is ~5 steps,
and 12 steps cover ~2.4 epochs (a third of the demo's SFT steps are first visits, as here). The anchor sees
fresh entries every step (it would not gain from repeats). --project-entries 0 gives ours fresh entries too.

    python bench/bench_cpu_train.py --steps 12 --warmup 2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the parent process reads afinar.core.environment too, not only the two children
ANCHOR_TRL = "1.16.0"


def anchor_site() -> Path:
    site = ROOT / ".cache" / f"trl-{ANCHOR_TRL}"
    if not (site / "trl").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        f"trl=={ANCHOR_TRL}"], check=True)
    return site


def entries(n: int) -> list[dict]:
    data = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    return data[:n]


class StepClock:
    """Real tokens and wall time at the end of each optimizer step."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []
        self.tokens = 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.marks.append((time.perf_counter(), clock.tokens))

        return _Cb()

    def rate(self, warmup: int) -> float:
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def run_anchor(steps: int, warmup: int, batch: int) -> dict:
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from afinar.core import embedded, prompts
    from afinar.core.environment import cpu_has_fast_bf16
    from afinar.core.settings import LORA_TARGET_MODULES

    path = embedded.ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from datasets import Dataset

    rows = [{"prompt": prompts.messages_for(e, with_answer=False),
             "completion": [{"role": "assistant", "content": e["output"]}]} for e in entries(steps * batch * 2)]
    clock = StepClock()

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            clock.tokens += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    config = SFTConfig(output_dir="/tmp/bench_anchor", per_device_train_batch_size=batch, max_steps=steps,
                       learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to="none",
                       max_length=512, use_cpu=True, seed=42, dataloader_num_workers=0,
                       # TRL turns bf16 on by default; on a CPU without AMX that is emulated bf16, 5-6x slower than
                       # fp32 (a 12-step anchor did not finish in 13 min on AVX2). fp32 is the stronger anchor there,
                       # and the one our path also uses on such a CPU; with AMX both sides use bf16.
                       bf16=cpu_has_fast_bf16())
    trainer = Counting(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGET_MODULES,
                                              task_type="CAUSAL_LM"),
                       callbacks=[clock.callback()])
    trainer.train()
    return {"name": f"anchor: TRL {trl.__version__} SFTTrainer, padded batch {batch}, "
                    f"{'bf16' if cpu_has_fast_bf16() else 'fp32'}",
            "tok_s": clock.rate(warmup)}


def run_project(steps: int, warmup: int, precision_flag: str = "auto", project_entries: int = 40,
                lora_layers: int | None = None) -> dict:
    import tempfile

    from afinar.train import engine, frozen_prefix, modeling
    from afinar.core import settings
    from afinar.core.environment import detect_device, precision_for
    from afinar.core.layout import OutputLayout
    from afinar.train import training

    device = detect_device()
    resolved = {key: settings.default(key, "cpu") for key in settings.TRAIN_KEYS}
    _, base_path = modeling.resolve_model("smollm2-135m")
    resolved.update({key: settings.default(key, "cpu") for key in settings.LOAD_KEYS if key in settings.DEFAULTS})
    resolved.update(model="smollm2", base_path=base_path, backend="hf", load_in_4bit=False,
                    max_steps=steps, save_steps=10_000, logging_steps=1000)
    if lora_layers:
        resolved["lora_layers"] = lora_layers  # 02 --lora-layers N
    precision = precision_for(device, precision_flag)
    model, tokenizer = modeling.build(resolved, device, precision)
    prefix = frozen_prefix.attach(model)  # as stage 03 does on a CPU
    clock = StepClock()
    original = training._make_trainer_class

    def counting_class(*args, **kwargs):
        base = original(*args, **kwargs)

        class Counting(base):
            def training_step(self, model, inputs, *args, **kwargs):
                clock.tokens += int(inputs["real_tokens"])
                out = super().training_step(model, inputs, *args, **kwargs)
                clock.marks.append((time.perf_counter(), clock.tokens))  # one optimizer step (no accumulation)
                return out

        return Counting

    training._make_trainer_class = counting_class
    with tempfile.TemporaryDirectory() as tmp:
        data = entries(project_entries or steps * resolved["batch_size"] * 4)
        plan = engine.plan(resolved, device)  # what stage 03 does on this CPU: its packing included
        metrics = training.train(model, tokenizer, data, layout=OutputLayout.at(tmp), settings=resolved,
                                 precision=precision, packing=plan.packing, open_rows=plan.open_rows,
                                 share_prefix=plan.share_prefix)
    layers = resolved.get("lora_layers") or "todas"
    return {"name": f"afinar (03): {precision}, LoRA en capas: {layers}, packing={plan.packing}, "
                    f"open_rows={plan.open_rows}, prefijo compartido={plan.share_prefix}, "
                    f"batch {resolved['batch_size']}", "tok_s": clock.rate(warmup),
            "entries": len(data),
            "epochs_covered": round(steps * resolved["batch_size"] / max(1, metrics["train_examples"]), 2),
            "frozen_prefix": prefix.summary() if prefix else None}


def _cpu_isa() -> str:
    """What the machine computes with: AMX / AVX-512 BF16 (native bf16) or AVX2 only."""
    from afinar.core.environment import cpu_has_fast_bf16

    flags = open("/proc/cpuinfo", encoding="utf-8").read()
    isa = "amx" if " amx_bf16" in flags else "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"
    return f"{isa} (bf16 nativo: {'sí' if cpu_has_fast_bf16() else 'no'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--only", choices=["anchor", "project"])
    parser.add_argument("--precision", default="auto", help="precisión de nuestra ruta (como --precision de 02)")
    parser.add_argument("--lora-layers", type=int, default=None, help="como 02 --lora-layers (por defecto: todas)")
    parser.add_argument("--project-entries", type=int, default=40,
                        help="entradas que nuestra ruta recorre en bucle (0: entradas nuevas en cada paso)")
    args = parser.parse_args()
    if args.only == "anchor":
        print("RESULT " + json.dumps(run_anchor(args.steps, args.warmup, args.batch)), flush=True)
        return
    if args.only == "project":
        print("RESULT " + json.dumps(run_project(args.steps, args.warmup, args.precision, args.project_entries,
                                                        args.lora_layers)),
              flush=True)
        return

    results = []
    for only, extra_path in (("anchor", str(anchor_site())), ("project", "")):
        # Keep an inherited PYTHONPATH (the lent GPU machine brings TRL and datasets in one) after ours.
        paths = (extra_path, str(ROOT), os.environ.get("PYTHONPATH", ""))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--only", only, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--batch", str(args.batch),
                               "--precision", args.precision, "--project-entries", str(args.project_entries),
                               *(["--lora-layers", str(args.lora_layers)] if args.lora_layers else [])],
                              env=env, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{only} falló")
        results.append(json.loads(line[-1][7:]))
    anchor, ours = results
    ratio = ours["tok_s"] / anchor["tok_s"]
    print(f"\n{'configuración':70s} {'tokens reales/s':>16s}")
    for r in results:
        print(f"{r['name']:70s} {r['tok_s']:16.1f}")
    print(f"\nproporción afinar / anchor: {ratio:.2f}x  (objetivo ≥ 2x)")
    # One file per kind of processor (the AVX2 and the AMX rows of BENCHMARKS.md), and the latest of any.
    isa = _cpu_isa().split()[0] if not os.environ.get("ATEN_CPU_CAPABILITY") else os.environ["ATEN_CPU_CAPABILITY"]
    suffix = f"_top{args.lora_layers}" if args.lora_layers else ""
    targets = [ROOT / "bench" / "results" / f"cpu_{isa}{suffix}.json"]
    if not suffix:
        targets.append(ROOT / "bench" / "results" / "cpu_latest.json")
    for out in targets:
        out.write_text(json.dumps({"device": "cpu", "cores": len(os.sched_getaffinity(0)),
                                   "torch": importlib.metadata.version("torch"),
                                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "steps": args.steps, "warmup": args.warmup, "anchor": anchor, "project": ours,
                                   "cpu_flags": _cpu_isa(), "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
                                   "ratio": round(ratio, 3)}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
