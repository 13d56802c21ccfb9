"""Benchmark of the contrast-test generation (afinar.evaluate.generation / afinar.evaluate.decoding) against plain transformers.

    python bench/bench_generation.py                                   # embedded model, CPU: batched vs sequential
    python bench/bench_generation.py --device cpu --max-new-tokens 64 --repeats 2
    python bench/bench_generation.py --suite --model /tmp/llama32_1b_shape --device cuda --out DIR

Default mode: answers the contrast questions one at a time and all in one batch with our path, greedy, and
prints tokens/s of each (best of --repeats), the speed-up and how many answers came out identical.

--suite (the GPU run of issue 17, one command): on the same card and in the same process
  1. end to end, warm-up included, the contrast set (the 10 questions, batch of 10, --max-new-tokens each):
     ours (default mode), plain `generate` eager and plain `generate(cache_implementation="static")`
     (transformers compiles the forward), each timed from a cold start of that path;
  2. steady state (after warm-up, best of --repeats), one sequence at a time and the 10 in one batch: ours
     (CUDA graphs; and, with --compile, torch.compile + graphs), and both anchors;
  3. identical answers: ours against `generate` eager, same batch, token by token;
  4. the CPU speed-up (batched / sequential, our path) on a random-weight SmolLM2-135M-shaped model in fp32 on
     --cpu-threads threads (the embedded model is not on the GPU machine; random weights give true speed);
writes generation_latest.json (and the raw rows) to --out. Random weights rarely produce EOS, so every row
runs to --max-new-tokens: speed figures are for that fixed length.
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

EMBEDDED_ALIAS = "smollm2-135m"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_ALIAS,
                   help=f"carpeta local de un modelo de transformers, id del Hub ya en caché o '{EMBEDDED_ALIAS}' "
                        f"(por defecto: {EMBEDDED_ALIAS}, el integrado)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda o cuda:N (por defecto: auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="precisión (por defecto: float32 en CPU, bfloat16 en CUDA)")
    p.add_argument("--questions", default=str(ROOT / "preguntas_contraste.json"),
                   help="fichero de preguntas de contraste (por defecto: preguntas_contraste.json)")
    p.add_argument("--limit", type=int, default=None, help="usar solo las N primeras preguntas")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens máximos por respuesta (por defecto: 200)")
    p.add_argument("--batch-size", type=int, default=10,
                   help="preguntas por lote en el modo por lotes (por defecto: 10, todas las de contraste a la vez)")
    p.add_argument("--repeats", type=int, default=1, help="mediciones de cada modo; se informa la más rápida")
    p.add_argument("--suite", action="store_true", help="la medición completa de GPU (ver arriba)")
    p.add_argument("--compile", action="store_true", help="con --suite, medir también el modo compile")
    p.add_argument("--cpu-threads", type=int, default=2, help="hilos para la parte de CPU de --suite (por defecto: 2)")
    p.add_argument("--cpu-tokens", type=int, default=32, help="tokens por respuesta en la parte de CPU de --suite")
    p.add_argument("--out", default=None, help="carpeta donde escribir generation_latest.json (por defecto: "
                                               "bench/results/ con --suite)")
    return p.parse_args(argv)


def resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("Se pidió --device cuda pero no hay ninguna GPU con CUDA disponible.")
    return device


def load(model_name: str, device, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core.embedded import ensure_checkpoint

    path = str(ensure_checkpoint()) if model_name == EMBEDDED_ALIAS else model_name
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).to(device).eval()
    return model, tokenizer, dtype_name


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(model, tokenizer, questions, max_new_tokens: int, batch_size: int, mode: str = "auto"):
    """Our path as 02/04 call it; (rows, seconds, generated tokens)."""
    from afinar.evaluate.generation import generate_answers

    os.environ["AFINAR_DECODE"] = mode
    try:
        synchronize(model.device)
        started = time.perf_counter()
        rows = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                seed=0, log=print)
        synchronize(model.device)
        seconds = time.perf_counter() - started
    finally:
        os.environ.pop("AFINAR_DECODE", None)
    return rows, seconds, sum(row["new_tokens"] for row in rows)


def anchor(model, tokenizer, questions, max_new_tokens: int, batch_size: int, static: bool):
    """Plain `model.generate` on the same left-padded batches and settings; (token lists, seconds, tokens)."""
    import torch

    from afinar.evaluate.generation import _generate_options, chat_prompt_ids, left_padded_batch, split_generated
    from afinar.core.prompts import ensure_pad_token, question_messages
    from afinar.evaluate.questions import question_text

    ensure_pad_token(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, question_messages(question_text(q))) for q in questions]
    options = _generate_options(model, tokenizer, max_new_tokens, False)
    extra = {"cache_implementation": "static"} if static else {}
    answers, tokens = [], 0
    synchronize(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = {k: v.to(model.device) for k, v in left_padded_batch(tokenizer, prompts[start:start + batch_size]).items()}
            out = model.generate(**batch, **options, **extra)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                ids, _ = split_generated(row, options["eos_token_id"], options["pad_token_id"])
                answers.append(ids)
                tokens += len(ids)
    synchronize(model.device)
    return answers, time.perf_counter() - started, tokens


def best(runs):
    return min(runs, key=lambda run: run[1])


def rate(run) -> float:
    return round(run[2] / run[1], 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.suite:
        return suite(args)
    import torch

    from afinar.evaluate.questions import load_questions

    questions = [q["pregunta"] for q in load_questions(args.questions)][: args.limit]
    device = resolve_device(args.device)
    model, tokenizer, dtype_name = load(args.model, device, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} hilos"
    print(f"Modelo: {args.model} ({dtype_name}) en {device} ({where})")
    print(f"Preguntas: {len(questions)}; max_new_tokens={args.max_new_tokens}; lote={args.batch_size}; voraz; "
          f"mejor de {max(1, args.repeats)} medición(es)")

    # Warm-up of both paths and every prompt shape: kernels, caches and the allocator are ready before timing.
    ours(model, tokenizer, questions, 4, 1)
    ours(model, tokenizer, questions, 4, args.batch_size)
    # Alternated (sequential, batched, sequential, ...) so a burst of load from other work hits both alike.
    seq_runs, bat_runs = [], []
    for _ in range(max(1, args.repeats)):
        seq_runs.append(ours(model, tokenizer, questions, args.max_new_tokens, 1))
        bat_runs.append(ours(model, tokenizer, questions, args.max_new_tokens, args.batch_size))
    (sequential, seq_s, seq_tokens), (batched, bat_s, bat_tokens) = best(seq_runs), best(bat_runs)
    seq_rate, bat_rate = seq_tokens / seq_s, bat_tokens / bat_s
    identical = sum(1 for a, b in zip(sequential, batched) if a["text"] == b["text"])
    print(f"secuencial (lote 1):  {seq_tokens} tokens en {seq_s:.2f} s = {seq_rate:.1f} tokens/s "
          f"(todas: {', '.join(f'{r[1]:.1f}' for r in seq_runs)} s)")
    print(f"por lotes  (lote {args.batch_size}): {bat_tokens} tokens en {bat_s:.2f} s = {bat_rate:.1f} tokens/s "
          f"(todas: {', '.join(f'{r[1]:.1f}' for r in bat_runs)} s)")
    print(f"aceleración: {bat_rate / seq_rate:.2f}x (tiempo total {seq_s / bat_s:.2f}x menor)")
    print(f"respuestas idénticas: {identical}/{len(questions)}; terminadas con EOS: "
          f"{sum(r['ended_with_eos'] for r in batched)}/{len(questions)}")


def suite(args) -> None:
    import torch

    from afinar.evaluate.questions import load_questions

    out_dir = Path(args.out or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = [q["pregunta"] for q in load_questions(args.questions)][: args.limit]
    device = resolve_device(args.device)
    n, new = len(questions), args.max_new_tokens
    report: dict = {"model": args.model, "device": str(device), "questions": n, "max_new_tokens": new,
                    "torch": torch.__version__}
    timings: dict = {}
    began = time.perf_counter()

    def note(key, value):
        report[key] = value
        print(f"[{time.perf_counter() - began:6.1f} s] {key} = {value}", flush=True)
        # Written after every figure: a run cut by its time limit still leaves what it measured.
        (out_dir / "generation_latest.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    # BENCH_SUITE_ON_CPU=1: the same steps on the CPU, only to check this script with a tiny model.
    if device.type == "cuda" or os.environ.get("BENCH_SUITE_ON_CPU"):
        import transformers

        report["transformers"] = transformers.__version__
        report["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU dry run)"
        model, tokenizer, dtype_name = load(args.model, device, args.dtype)
        report["dtype"] = dtype_name
        # Common one-time set-up (CUDA context, cuBLAS handles, allocator) before any timing: no path pays it.
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3]], device=device))
        synchronize(device)

        # 1. End to end, each path cold. Ours first: CUDA-graph recording is its whole warm-up.
        run = ours(model, tokenizer, questions, new, n)
        note("gpu_contrast_seconds", round(run[1], 3))
        timings["ours_contrast"] = run
        run = anchor(model, tokenizer, questions, new, n, static=False)
        note("anchor_eager_contrast_seconds", round(run[1], 3))
        timings["eager_contrast"] = run
        run = anchor(model, tokenizer, questions, new, n, static=True)
        note("anchor_static_contrast_seconds", round(run[1], 3))  # includes transformers' compilation
        note("anchor_best_contrast_seconds", round(min(report["anchor_eager_contrast_seconds"],
                                                       report["anchor_static_contrast_seconds"]), 3))
        note("contrast_ratio", round(report["gpu_contrast_seconds"] / report["anchor_best_contrast_seconds"], 3))

        # 2. Steady state (everything above already warmed each path for batch 10).
        reps = max(1, args.repeats)
        t = time.perf_counter()
        ours(model, tokenizer, questions[:1], 8, 1)
        note("ours_warmup_sequential_seconds", round(time.perf_counter() - t, 3))
        note("gpu_sequential_tok_s", rate(best([ours(model, tokenizer, questions, new, 1) for _ in range(reps)])))
        note("gpu_batched_tok_s", rate(best([ours(model, tokenizer, questions, new, n) for _ in range(reps)])))
        t = time.perf_counter()
        anchor(model, tokenizer, questions[:1], 8, 1, static=True)
        note("anchor_static_warmup_sequential_seconds", round(time.perf_counter() - t, 3))
        note("anchor_static_sequential_tok_s",
             rate(best([anchor(model, tokenizer, questions, new, 1, static=True) for _ in range(reps)])))
        note("anchor_static_batched_tok_s",
             rate(best([anchor(model, tokenizer, questions, new, n, static=True) for _ in range(reps)])))
        # Eager sequential is slow (~70 tokens/s): 3 questions are enough for its rate.
        note("anchor_eager_sequential_tok_s", rate(anchor(model, tokenizer, questions[:3], new, 1, static=False)))
        note("anchor_eager_batched_tok_s", rate(anchor(model, tokenizer, questions, new, n, static=False)))
        note("sequential_ratio", round(report["gpu_sequential_tok_s"] / report["anchor_static_sequential_tok_s"], 3))
        note("batched_ratio", round(report["gpu_batched_tok_s"] / report["anchor_static_batched_tok_s"], 3))
        # 3. Identical answers: ours (batch 10) against generate eager on the same batch.
        ours_rows = timings["ours_contrast"][0]
        reference = timings["eager_contrast"][0]
        same_text = [r["text"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
                     for r, ids in zip(ours_rows, reference)]
        note("identical_answers", f"{sum(same_text)}/{n}")
        note("first_difference_chars", [_first_difference(r["text"], tokenizer.decode(ids, skip_special_tokens=True)
                                                          .strip()) for r, ids in zip(ours_rows, reference)])
        from afinar.evaluate.decoding import _broken

        note("fast_path_failures", dict(_broken))

    # 4. CPU speed-up on the 135M shape.
    for key, value in cpu_part(args, questions).items():
        note(key, value)

    # 5. Last, as it may take longest on a fresh machine (compilation): our compiled mode.
    if device.type == "cuda" or os.environ.get("BENCH_SUITE_ON_CPU"):
        if args.compile:
            t = time.perf_counter()
            ours(model, tokenizer, questions, 8, n, mode="compile")
            note("ours_compile_warmup_seconds", round(time.perf_counter() - t, 3))
            ours(model, tokenizer, questions[:1], 8, 1, mode="compile")
            note("gpu_compile_sequential_tok_s",
                 rate(best([ours(model, tokenizer, questions, new, 1, mode="compile") for _ in range(reps)])))
            compiled = best([ours(model, tokenizer, questions, new, n, mode="compile") for _ in range(reps)])
            note("gpu_compile_batched_tok_s", rate(compiled))
            note("compile_sequential_ratio",
                 round(report["gpu_compile_sequential_tok_s"] / report["anchor_static_sequential_tok_s"], 3))
            note("compile_batched_ratio",
                 round(report["gpu_compile_batched_tok_s"] / report["anchor_static_batched_tok_s"], 3))
            same = [r["text"] == tokenizer.decode(ids, skip_special_tokens=True).strip()
                    for r, ids in zip(compiled[0], timings["eager_contrast"][0])]
            note("identical_answers_compile", f"{sum(same)}/{n}")

        note("fast_path_failures", dict(_broken))
    report["seconds_total"] = round(time.perf_counter() - began, 1)
    (out_dir / "generation_latest.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print("\n| medida | valor |\n|---|---|")
    for key in ("gpu_sequential_tok_s", "anchor_static_sequential_tok_s", "sequential_ratio", "gpu_batched_tok_s",
                "anchor_static_batched_tok_s", "batched_ratio", "gpu_contrast_seconds", "anchor_best_contrast_seconds",
                "contrast_ratio", "anchor_eager_contrast_seconds", "anchor_static_contrast_seconds",
                "anchor_eager_sequential_tok_s", "anchor_eager_batched_tok_s", "gpu_compile_sequential_tok_s",
                "gpu_compile_batched_tok_s", "compile_sequential_ratio", "compile_batched_ratio",
                "ours_compile_warmup_seconds", "identical_answers", "identical_answers_compile", "cpu_speedup",
                "fast_path_failures"):
        if key in report:
            print(f"| {key} | {report[key]} |")


def cpu_part(args, questions) -> dict:
    """Batched / sequential on the CPU, our path, a SmolLM2-135M-shaped model (random weights unless the embedded
    one is available), fp32, --cpu-threads threads."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        model, tokenizer, source = _cpu_model()
        n, new = len(questions), args.cpu_tokens
        ours(model, tokenizer, questions[:2], 2, 1)
        ours(model, tokenizer, questions, 2, n)
        seq, bat = [], []
        for _ in range(2):
            seq.append(ours(model, tokenizer, questions, new, 1))
            bat.append(ours(model, tokenizer, questions, new, n))
        seq_rate, bat_rate = rate(best(seq)), rate(best(bat))
        return {"cpu_model": source, "cpu_threads": args.cpu_threads, "cpu_new_tokens": new,
                "cpu_sequential_tok_s": seq_rate, "cpu_batched_tok_s": bat_rate,
                "cpu_speedup": round(bat_rate / seq_rate, 2)}
    finally:
        torch.set_num_threads(threads_before)


def _cpu_model():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        from afinar.core.embedded import ensure_checkpoint

        path = ensure_checkpoint(verbose=False)
        from transformers import AutoModelForCausalLM

        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                AutoTokenizer.from_pretrained(path), "embedded SmolLM2-135M-Instruct")
    except Exception:  # noqa: BLE001 - no embedded model here (the GPU machine): same shape, random weights
        pass
    tok_dir = ROOT / ".gpu" / "tok"
    if not tok_dir.is_dir():
        tok_dir = Path("/tmp/llama32_1b_shape")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer, "SmolLM2-135M shape, random weights"


def _first_difference(a: str, b: str):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


if __name__ == "__main__":
    main()
