"""Benchmark of stage 04's export on the embedded model (not a test: prints figures).

    python bench/bench_export.py                # bf16 merge + GGUF f16 and q8_0, all checks on
    python bench/bench_export.py --threads 1    # torch threads, e.g. when other jobs share the cores

Builds a random r=16 LoRA adapter on the embedded SmolLM2-135M (not timed), then times what stage 04
does after training: the verified 16-bit merge, and the export to GGUF F16 and Q8_0 with each file read
back by transformers. Target: merge + export in at most 60 s on 2 cores. The load average is printed
before and after, because other processes on the same cores slow PyTorch down a lot.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SECONDS = 60.0


def make_adapter(base: Path, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="hilos de torch (por defecto, los de torch)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = parser.parse_args()

    started = time.perf_counter()
    import torch

    from afinar.embedded import ensure_checkpoint
    from afinar.gguf_export import export_gguf
    from afinar.merge import merge_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    imports = time.perf_counter() - started
    base = ensure_checkpoint(verbose=False)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        root = Path(tmp)
        make_adapter(base, root / "adapter")

        t0 = time.perf_counter()
        merged = merge_adapter(base, root / "adapter", root / "merged_16bit", dtype=args.dtype)
        t1 = time.perf_counter()
        files = export_gguf(root / "merged_16bit", root / "gguf", ("f16", "q8_0"))
        t2 = time.perf_counter()

    merge_s, export_s = t1 - t0, t2 - t1
    total = merge_s + export_s
    print(f"máquina: {os.cpu_count()} núcleos, torch {torch.__version__} con {torch.get_num_threads()} hilos; "
          f"carga media antes {load_before:.2f}, después {os.getloadavg()[0]:.2f}")
    print(f"importaciones: {imports:.1f} s (no cuentan)")
    check = merged["verification"]
    print(f"fusión {args.dtype}: {merge_s:.1f} s  ({merged['parameters'] / 1e6:.1f} M parámetros, "
          f"{merged['bytes'] / 2**20:.0f} MiB; max|Δlogit| {check['max_abs_logit_diff']:.3f} = "
          f"{check['relative_max_diff']:.3f} × σ, top-1 {check['top1_agreement']:.1%})")
    for record in files:
        check = record["verification"]
        print(f"GGUF {record['type']:<5}: {record['seconds_write'] + record['seconds_verify']:.1f} s "
              f"(escritura {record['seconds_write']:.1f} s, verificación {record['seconds_verify']:.1f} s; "
              f"{record['bytes'] / 2**20:.0f} MiB; max|Δlogit| {check['max_abs_logit_diff']:.3f} = "
              f"{check['relative_max_diff']:.4f} × σ, top-1 {check['top1_agreement']:.1%})")
    print(f"exportación GGUF total (incluida la referencia): {export_s:.1f} s")
    verdict = "dentro" if total <= TARGET_SECONDS else "FUERA"
    print(f"TOTAL fusión + GGUF: {total:.1f} s — {verdict} del objetivo de {TARGET_SECONDS:.0f} s")


if __name__ == "__main__":
    main()
