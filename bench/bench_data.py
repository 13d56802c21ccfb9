"""Benchmark of the data check and cleaning on a large synthetic file (not a test: prints figures).

    python bench/bench_data.py                 # 50,000 entries, JSON Lines
    python bench/bench_data.py --entries 100000 --format json

Writes a file of varied synthetic entries (with 2% exact and 2% near duplicates planted), then measures,
in a fresh child process so generation does not count: reading + validation, duplicate and language
screening, wall time of each and the peak resident memory compared with the memory the entries themselves
take. Target: 50,000 entries in under 60 s on 2 cores, memory growing by little more than the entries.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _deep_size_mb(entries: list[dict]) -> float:
    size = sys.getsizeof(entries)
    for entry in entries:
        size += sys.getsizeof(entry) + sum(sys.getsizeof(v) for v in entry.values())
    return size / (1024 * 1024)


def generate(path: Path, count: int, fmt: str, seed: int) -> None:
    from synthetic_entries import entries as synthetic

    rows = synthetic(count, seed=seed)
    rng = random.Random(seed)
    for i in rng.sample(range(count), count // 50):  # exact duplicates, differing in case and spacing
        source = rows[rng.randrange(count)]
        rows[i] = {k: "  " + v.upper() if k == "output" else v for k, v in source.items()}
    for i in rng.sample(range(count), count // 50):  # near duplicates: one word of the answer replaced
        source = dict(rows[rng.randrange(count)])
        words = source["output"].split()
        words[rng.randrange(len(words))] = "modificado"
        source["output"] = " ".join(words)
        rows[i] = source
    with open(path, "w", encoding="utf-8") as handle:
        if fmt == "jsonl":
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, handle, ensure_ascii=False)


def measure(path: Path) -> None:
    from afinar.data import data_clean
    from afinar.data.data_check import read_dataset

    bare = _rss_mb()
    # Fixed costs, paid once whatever the data size: datasketch (imports scipy) and the langid model.
    data_clean._lsh_plan(data_clean.NEAR_DUPLICATE_THRESHOLD, data_clean.NUM_PERM)
    data_clean._identifier()
    gc.collect()
    base = _rss_mb()
    start = time.perf_counter()
    checked = read_dataset(path)
    read_s = time.perf_counter() - start
    after_read = _rss_mb()
    peak_read = _peak_mb()
    entries_mb = _deep_size_mb(checked.entries)
    start = time.perf_counter()
    result = data_clean.clean(checked.entries)
    clean_s = time.perf_counter() - start
    peak = _peak_mb()
    size_mb = path.stat().st_size / (1024 * 1024)
    print(f"archivo: {path.name} ({size_mb:.1f} MB, {len(checked.entries)} entradas)")
    print(f"lectura y validación: {read_s:.1f} s")
    print(f"duplicados e idioma: {clean_s:.1f} s ({len(result.exact)} exactos, {len(result.near)} casi, "
          f"{len(result.non_spanish)} no españolas)")
    print(f"total: {read_s + clean_s:.1f} s")
    print(f"memoria: bibliotecas y modelo de idioma {base - bare:.0f} MB (fijo); "
          f"RSS base {base:.0f} MB; las entradas ocupan {entries_mb:.0f} MB; "
          f"RSS tras leer {after_read:.0f} MB (pico {peak_read:.0f} MB); pico total {peak:.0f} MB "
          f"(+{peak - base:.0f} MB sobre la base, {peak - base - entries_mb:.0f} MB más que las entradas)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--format", choices=("jsonl", "json"), default="jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"bench_{args.entries}.{args.format}"
        start = time.perf_counter()
        generate(path, args.entries, args.format, args.seed)
        print(f"generado en {time.perf_counter() - start:.1f} s")
        subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True)


if __name__ == "__main__":
    main()
