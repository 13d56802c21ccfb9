"""Benchmark of stage 04's export on the embedded model (not a test: prints figures).

    python bench/bench_export.py                # bf16 merge + GGUF f16 and q8_0, all checks on
    python bench/bench_export.py --threads 1    # torch threads, e.g. when other jobs share the cores
    python bench/bench_export.py --types f16,q4_k_m                 # other GGUF types, verified the same way
    python bench/bench_export.py --llama-1b --types f16,q4_k_m      # Llama-3.2-1B shape, random weights

Builds a random r=16 LoRA adapter on the embedded SmolLM2-135M (not timed), then times what stage 04
does after training: the verified 16-bit merge, and the export to GGUF F16 and Q8_0 with each file read
back by transformers. Target: merge + export in at most 60 s on 2 cores. The load average is printed
before and after, because other processes on the same cores slow PyTorch down a lot.

--llama-1b times only the writing of each GGUF file for a randomly initialized model of
Llama-3.2-1B's shape (16 layers, hidden 2048, intermediate 8192, 32/8 heads, vocabulary 128256, tied
embeddings, llama3 rope): its rows fill 256-value super-blocks, so Q4_K_M really is Q4_K + Q6_K.
Random weights have no meaningful logits to compare, so the read-back check is off there.
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
    parser.add_argument("--types", default="f16,q8_0", help="tipos GGUF separados por comas")
    parser.add_argument("--llama-1b", action="store_true",
                        help="modelo aleatorio con la forma de Llama-3.2-1B, solo escritura (sin verificación)")
    args = parser.parse_args()
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    if args.llama_1b:
        bench_llama_1b(types, args.threads)
        return

    started = time.perf_counter()
    import torch

    from afinar.core.embedded import ensure_checkpoint
    from afinar.export.gguf_export import export_gguf
    from afinar.export.merge import merge_adapter

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
        files = export_gguf(root / "merged_16bit", root / "gguf", types)
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


def bench_llama_1b(types: tuple[str, ...], threads: int | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from afinar.core.embedded import ensure_checkpoint
    from afinar.export.gguf_export import export_gguf

    if threads:
        torch.set_num_threads(threads)
    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    with tempfile.TemporaryDirectory(prefix="bench_export_1b_") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / "model")
        del model
        # A chat tokenizer is all the exporter needs from it; its 49152 tokens leave the rest as padding.
        AutoTokenizer.from_pretrained(ensure_checkpoint(verbose=False)).save_pretrained(root / "model")
        load_before = os.getloadavg()[0]
        records = []
        for out_type in types:
            started = time.perf_counter()
            (record,) = export_gguf(root / "model", root / "gguf", (out_type,), verify=False)
            records.append((record, time.perf_counter() - started))
        print(f"máquina: {os.cpu_count()} núcleos; carga media antes {load_before:.2f}, después "
              f"{os.getloadavg()[0]:.2f}; modelo con forma de Llama-3.2-1B, {parameters / 1e9:.3f} mil millones "
              f"de parámetros, pesos aleatorios bf16")
        f16 = next((r["bytes"] for r, _ in records if r["type"] == "f16"), None)
        for record, seconds in records:
            ratio = f" = {record['bytes'] / f16:.3f} × f16" if f16 else ""
            print(f"GGUF {record['type']:<6}: escritura {seconds:.1f} s; {record['bytes'] / 2**20:.0f} MiB "
                  f"({record['bytes'] * 8 / parameters:.2f} bits por parámetro){ratio}")


if __name__ == "__main__":
    main()
