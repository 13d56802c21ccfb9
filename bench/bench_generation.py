"""Benchmark of the contrast-test generation: batched (left padding) against one question at a time.

    python bench/bench_generation.py                                   # embedded model, CPU or CUDA if present
    python bench/bench_generation.py --device cpu --max-new-tokens 64
    python bench/bench_generation.py --model /ruta/Llama-3.2-1B-Instruct --device cuda --repeats 3

Answers the same questions both ways with greedy decoding and prints the generated tokens per second of
each (best of --repeats runs), the speed-up, and how many answers came out identical: all of them in fp32;
in bf16/fp16 a padded batch may round differently and change late tokens, above all where the top two
tokens are nearly tied. Both paths are warmed up first so neither pays for one-time setup.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--batch-size", type=int, default=8, help="preguntas por lote (por defecto: 8)")
    p.add_argument("--repeats", type=int, default=1,
                   help="mediciones de cada modo; se informa la más rápida (por defecto: 1; en GPU conviene 3, "
                        "porque allí cada paso lo limita la CPU que lanza los kernels y su tiempo varía)")
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

    from afinar.embedded import ensure_checkpoint

    path = str(ensure_checkpoint()) if model_name == EMBEDDED_ALIAS else model_name
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).to(device)
    return model, tokenizer, dtype_name


def timed(model, tokenizer, questions, max_new_tokens: int, batch_size: int):
    from afinar.generation import generate_answers

    started = time.perf_counter()
    rows = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=0)
    seconds = time.perf_counter() - started
    return rows, seconds, sum(row["new_tokens"] for row in rows)


def best_of(repeats: int, *args):
    runs = [timed(*args) for _ in range(max(1, repeats))]
    return min(runs, key=lambda run: run[1])


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from afinar.questions import load_questions

    questions = [q["pregunta"] for q in load_questions(args.questions)][: args.limit]
    device = resolve_device(args.device)
    model, tokenizer, dtype_name = load(args.model, device, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} hilos"
    print(f"Modelo: {args.model} ({dtype_name}) en {device} ({where})")
    print(f"Preguntas: {len(questions)}; max_new_tokens={args.max_new_tokens}; lote={args.batch_size}; voraz; "
          f"mejor de {max(1, args.repeats)} medición(es)")

    # Warm-up of both paths and every prompt shape: kernels, caches and the allocator are ready before timing.
    timed(model, tokenizer, questions, 8, 1)
    timed(model, tokenizer, questions, 8, args.batch_size)

    sequential, seq_s, seq_tokens = best_of(args.repeats, model, tokenizer, questions, args.max_new_tokens, 1)
    batched, bat_s, bat_tokens = best_of(args.repeats, model, tokenizer, questions, args.max_new_tokens,
                                         args.batch_size)

    seq_rate, bat_rate = seq_tokens / seq_s, bat_tokens / bat_s
    identical = sum(1 for a, b in zip(sequential, batched) if a["text"] == b["text"])
    print(f"secuencial (lote 1):  {seq_tokens} tokens en {seq_s:.2f} s = {seq_rate:.1f} tokens/s")
    print(f"por lotes  (lote {args.batch_size}): {bat_tokens} tokens en {bat_s:.2f} s = {bat_rate:.1f} tokens/s")
    print(f"aceleración: {bat_rate / seq_rate:.2f}x (tiempo total {seq_s / bat_s:.2f}x menor)")
    print(f"respuestas idénticas: {identical}/{len(questions)}; terminadas con EOS: "
          f"{sum(r['ended_with_eos'] for r in batched)}/{len(questions)}")


if __name__ == "__main__":
    main()
