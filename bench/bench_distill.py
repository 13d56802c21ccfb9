"""Benchmark of the distillation step (not a test: prints figures).

    python bench/bench_distill.py                      # both parts
    python bench/bench_distill.py --part server        # 200 entries from the loopback server, concurrency 8
    python bench/bench_distill.py --part server --latency 0.2 --concurrency 1   # a server that takes 0.2 s
    python bench/bench_distill.py --part embedded      # answers per minute from the embedded model on CPU

Part "server": the loopback fake OpenAI server answers instantly, so the figure is our own overhead per entry
(HTTP client, cache append with fsync, JSON parsing, the checks and the report), the ceiling a real API
cannot raise. Part "embedded": the embedded SmolLM2-135M as a local teacher, batched, with the plan's default
token limits; its answers are mostly rejected (a 135M model rarely writes the JSON asked for), so the
figure that matters is answers generated per minute, with kept entries per minute alongside.
Each part uses a fresh cache in a temporary folder, so nothing is served from an earlier run.
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
sys.path.insert(0, str(ROOT / "tests"))

from afinar.data import distill, teacher  # noqa: E402

TOPICS = ["fase luminosa", "ciclo de Calvin", "estomas", "clorofila", "fotorrespiración", "plantas C4",
          "plantas CAM", "fotosistema II", "cadena de transporte de electrones", "ATP sintasa", "rubisco",
          "pigmentos accesorios", "cloroplastos", "respiración celular", "fijación del carbono", "floema",
          "xilema", "transpiración", "luz y longitud de onda", "algas y cianobacterias"]


def bench_server(workdir: Path, concurrency: int, latency: float = 0.0) -> None:
    from fake_teacher import FakeTeacher

    settings = distill.Settings(topics=TOPICS, counts=distill.Counts(2, 6, 2), cache_path=workdir / "s.cache.jsonl",
                                output=workdir / "s.json", concurrency=concurrency)
    quiet = open(os.devnull, "w")
    with FakeTeacher(latency_s=latency) as fake:
        client = teacher.HttpTeacher(fake.url, "fake", None, timeout=30)
        stdout, sys.stdout = sys.stdout, quiet
        began = time.perf_counter()
        try:
            summary = distill.Distiller(client, settings, log=lambda m: None).run()
        finally:
            sys.stdout = stdout
        seconds = time.perf_counter() - began
    print(f"servidor local: {summary['planned']} entradas pedidas, {summary['kept']} conservadas, "
          f"{fake.count} peticiones, latencia del servidor {latency:g} s, concurrencia {concurrency}: "
          f"{seconds:.2f} s, "
          f"{summary['planned'] / seconds:.1f} entradas/s")


def bench_embedded(workdir: Path, answers: int, batch_size: int) -> None:
    client = teacher.LocalTeacher("smollm2-135m", batch_size=batch_size)
    settings = distill.Settings(topics=["la fotosíntesis"], counts=distill.Counts(0, answers, 0),
                                cache_path=workdir / "e.cache.jsonl", output=workdir / "e.json", json_retries=0)
    began = time.perf_counter()
    summary = distill.Distiller(client, settings, log=lambda m: None).run()
    minutes = (time.perf_counter() - began) / 60
    print(f"modelo integrado (CPU, lotes de {batch_size}, máx. {settings.max_tokens['short']} tokens): "
          f"{summary['answers_from_teacher']} respuestas en {minutes * 60:.1f} s = "
          f"{summary['answers_from_teacher'] / minutes:.1f} respuestas/min; {summary['completion_tokens']} tokens "
          f"generados ({summary['completion_tokens'] / minutes / 60:.1f} tokens/s); conservadas "
          f"{summary['kept']} ({summary['kept'] / minutes:.1f} entradas/min); descartes: "
          f"{summary['rejected_by_reason']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["server", "embedded", "both"], default="both")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency", type=float, default=0.0,
                   help="seconds the fake server waits before each answer (0: our own overhead only)")
    p.add_argument("--embedded-answers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    print(f"CPU: {os.cpu_count()} núcleos visibles; carga media {os.getloadavg()[0]:.1f} (máquina compartida)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("server", "both"):
            bench_server(Path(tmp), args.concurrency, args.latency)
        if args.part in ("embedded", "both"):
            bench_embedded(Path(tmp), args.embedded_answers, args.batch_size)


if __name__ == "__main__":
    main()
