"""Where one decode step spends its time on a GPU, and what each variant of afinar.evaluate.decoding gains (issue 17).

    python3 .gpu/anchor_bench.py make && python3 bench/decode_lab.py --model /tmp/llama32_1b_shape --out $OUT

For batch 1 and 10 (the contrast prompts, left-padded, 128 new tokens, penalty 1.15), each variant is timed cold
(its first call: recording, compilation) and warm (best of 3 later calls of the same shape), and its tokens are
compared with those of the first variant. A torch.profiler trace of one warm call per variant gives the number of
kernels per step and the GPU time they add up to (kernels inside CUDA graphs included). Variants run in order and
are skipped once --deadline seconds have passed, so a cut run still writes what it measured (one JSON file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, AFINAR_DECODE, AFINAR_COMPILE_MODE, AFINAR_COMPILE_FULLGRAPH, what it should cost before compiling)
VARIANTS = [
    ("graphs", "graphs", None, "1", 10),
    ("compile", "compile", "default", "1", 60),
    ("compile_nofull", "compile", "default", "0", 60),
    ("autotune", "compile", "max-autotune-no-cudagraphs", "1", 150),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/llama32_1b_shape")
    p.add_argument("--out", default="/tmp")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--deadline", type=float, default=330.0)
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    args = p.parse_args()
    began = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import afinar.evaluate.decoding as decoding
    from afinar.evaluate.generation import _generate_options, chat_prompt_ids, left_padded_batch
    from afinar.core.prompts import ensure_pad_token, question_messages
    from afinar.evaluate.questions import load_questions, question_text

    device = torch.device("cuda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    questions = [q["pregunta"] for q in load_questions(ROOT / "preguntas_contraste.json")]
    prompts = [chat_prompt_ids(tokenizer, question_messages(question_text(q))) for q in questions]
    options = _generate_options(model, tokenizer, args.new, False)
    batches = {1: left_padded_batch(tokenizer, prompts[:1]), 10: left_padded_batch(tokenizer, prompts)}
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(device), "new": args.new,
                    "widths": {b: int(v["input_ids"].shape[1]) for b, v in batches.items()}, "variants": {}}
    out_file = Path(args.out) / "decode_lab.json"

    def save():
        out_file.write_text(json.dumps(report, indent=1) + "\n")

    def call(batch):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            tokens = decoding.greedy_generate(model, batch["input_ids"], batch["attention_mask"],
                                              max_new_tokens=args.new,
                                              repetition_penalty=options["repetition_penalty"],
                                              stop_ids=options["eos_token_id"], pad_id=options["pad_token_id"],
                                              log=lambda m: report.setdefault("log", []).append(m))
        torch.cuda.synchronize()
        return tokens, time.perf_counter() - t

    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]], device=device))
    # The weights' read floor: one pass over every parameter (bf16), timed as a copy (read + write).
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    flat = torch.empty(weights // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(flat)
    for _ in range(3):
        dst.copy_(flat)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(flat)
    torch.cuda.synchronize()
    copy_s = (time.perf_counter() - t) / 10
    report["weights_gb"] = round(weights / 1e9, 3)
    report["copy_tb_s"] = round(2 * weights / copy_s / 1e12, 2)
    report["read_floor_ms_per_step"] = round(weights / (2 * weights / copy_s) * 1e3, 3)
    del flat, dst
    save()

    reference = {}
    wanted = args.variants.split(",")
    for name, decode, compile_mode, fullgraph, needs in VARIANTS:
        if name not in wanted:
            continue
        if time.perf_counter() - began + needs > args.deadline:
            report["variants"][name] = "skipped (deadline)"
            save()
            continue
        os.environ[decoding.MODE_ENV] = decode
        os.environ["AFINAR_COMPILE_FULLGRAPH"] = fullgraph
        if compile_mode:
            os.environ[decoding.COMPILE_MODE_ENV] = compile_mode
        row: dict = {}
        report["variants"][name] = row
        for size, batch in batches.items():
            if time.perf_counter() - began + needs > args.deadline:
                row[f"b{size}"] = "skipped (deadline)"
                continue
            try:
                tokens, cold = call(batch)
                warm = min(call(batch)[1] for _ in range(3))
                entry = {"cold_s": round(cold, 3), "warm_s": round(warm, 4), "steps": int(tokens.shape[1]),
                         "tok_s": round(tokens.numel() / warm, 1),
                         "ms_per_step": round(warm / tokens.shape[1] * 1e3, 3)}
                if size not in reference:
                    reference[size] = tokens
                else:
                    ref = reference[size]
                    entry["same_rows_as_first_variant"] = sum(
                        bool(torch.equal(a, b)) for a, b in zip(tokens, ref[:, : tokens.shape[1]]))
                entry.update(_profile(torch, lambda: call(batch), tokens.shape[1]))
                row[f"b{size}"] = entry
            except Exception as err:  # noqa: BLE001 - record and go on with the next variant
                row[f"b{size}"] = f"{type(err).__name__}: {str(err)[:600]}"
            row["broken"] = dict(decoding._broken)
            save()
            print(f"[{time.perf_counter() - began:6.1f} s] {name} b{size}: {row[f'b{size}'] if isinstance(row[f'b{size}'], str) else {k: v for k, v in row[f'b{size}'].items() if k != 'top'}}", flush=True)
        decoding._broken.clear()
    report["seconds"] = round(time.perf_counter() - began, 1)
    save()


def _profile(torch, run, steps):
    """Kernels per step, their summed GPU time per step, and the 8 costliest kernel names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels) if kernels else 0.0
    by_name: dict = {}
    for e in kernels:
        slot = by_name.setdefault(e.name[:70], [0, 0.0])
        slot[0] += 1
        slot[1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:8]
    return {"kernels_per_step": round(len(kernels) / steps, 1), "gpu_ms_per_step": round(total_us / steps / 1e3, 3),
            "top": [[n, c, round(us / steps, 1)] for n, (c, us) in top]}


if __name__ == "__main__":
    main()
