"""The CPU demo (02 → 03 → 04 without merge) under several settings at once, one pair of cores each.

Each configuration runs the real scripts on the embedded model in its own output folder, pinned to two cores
with two threads (the shape of the 2-core machine the demo targets), and the table at the end gives what
the contrast report measures: held-out perplexity ratio, the misconception probe before → after, the answers
that state the corrected fact, EOS, Spanish, worst repeated 3-grams, and each stage's seconds.

    python bench/cpu_demo_sweep.py --out /tmp/sweep \\
        "base|" "lr4e-3|--learning-rate 4e-3" "top20|--lora-layers 20 @02"

A configuration is NAME|FLAGS: flags for 03, and flags after "@02" go to 02 instead. Timings only compare
configurations of the same call (several run side by side and share the memory bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_flags(spec: str) -> tuple[str, list[str], list[str]]:
    name, _, flags = spec.partition("|")
    train, load = [], []
    target = train
    for token in shlex.split(flags):
        if token == "@02":
            target = load
            continue
        target.append(token)
    return name, load, train


def _stage_done(folder: Path, stage: str) -> bool:
    try:
        manifest = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("stages", {}).get(stage, {}).get("status") == "done"


def run_one(spec: str, out: Path, cores: str, extra_env: dict[str, str], keep: bool = False) -> dict:
    name, load_flags, train_flags = split_flags(spec)
    folder = out / name
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **extra_env}
    log = (out / f"{name}.log").open("w")
    seconds = {}
    commands = [
        ("02", ["02_load_model.py", "--output-dir", str(folder), "--overwrite", *load_flags]),
        ("03", ["03_train_model.py", "--output-dir", str(folder), *train_flags]),
        ("04", ["04_inference_and_export.py", "--output-dir", str(folder), "--no-merge"]),
    ]
    done_name = {"02": "load", "03": "train", "04": "export"}
    for stage, args in commands:
        if keep and _stage_done(folder, done_name[stage]):
            continue  # --keep: a later call finishes what an earlier one (cut by its time limit) left
        if keep and stage == "03":
            args = [*args, "--overwrite"]
        started = time.perf_counter()
        code = subprocess.run(["taskset", "-c", cores, sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
        seconds[stage] = round(time.perf_counter() - started, 1)
        if code != 0:
            return {"name": name, "failed": stage, "seconds": seconds}
    contrast = json.loads((folder / "contraste" / "contraste.json").read_text(encoding="utf-8"))
    manifest = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    train = manifest["stages"]["train"]["metrics"]
    after = contrast["aggregate"]["after"]
    probe = contrast.get("probe") or {}
    ppl = contrast["perplexity"]
    facts = [q["after"]["fact"]["passed"] for q in contrast["questions"] if q["after"].get("fact")]
    row = {
        "name": name, "seconds": seconds, "steps": train.get("global_step"),
        "tokens_per_second": train.get("tokens_per_second"),
        "ppl_before": ppl["before"], "ppl_after": ppl["after"],
        "ppl_ratio": round(ppl["after"] / ppl["before"], 4) if ppl["before"] else None,
        "probe_before": probe.get("true_wins_before"), "probe_after": probe.get("true_wins_after"),
        "probe_pairs": probe.get("pairs"), "facts": f"{sum(facts)}/{len(facts)}",
        "eos": f"{after['ended_with_eos']}/{after['answers']}", "spanish": after["spanish_ratio"],
        "worst_3gram": after["repeated_3gram_ratio_max"], "ready": contrast["verdict"]["ready"],
        "preference": train.get("preference"),
    }
    # Written as soon as this configuration ends: a call cut short still returns the finished ones.
    (out / f"{name}.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--out", default="/tmp/sweep")
    parser.add_argument("--first-core", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="no repetir las etapas ya terminadas en --out")
    parser.add_argument("--avx2", action="store_true", help="ATEN_CPU_CAPABILITY=avx2 y ONEDNN_MAX_CPU_ISA=AVX2")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if args.avx2 else {}
    jobs = []
    with ThreadPoolExecutor(len(args.configs)) as pool:
        for i, spec in enumerate(args.configs):
            cores = f"{args.first_core + 2 * i},{args.first_core + 2 * i + 1}"
            jobs.append(pool.submit(run_one, spec, out, cores, env, args.keep))
    results = [job.result() for job in jobs]
    for row in results:
        (out / f"{row['name']}.json").write_text(json.dumps(row, ensure_ascii=False), encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    for row in results:
        print(json.dumps({k: v for k, v in row.items() if k != "preference"}, ensure_ascii=False))


if __name__ == "__main__":
    main()
