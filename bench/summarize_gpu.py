"""Table and bench/results/latest.json from the RESULT files one bench/run_gpu.sh call left in its folder.

    python bench/summarize_gpu.py OUT_DIR
Anchors are the ../shared/gpu/anchor_bench.py results; ours are bench/bench_gpu_train.py's (afinar_*.json).
Names that carry meaning: afinar_default (03 as it runs on this card at the seed's settings: 4-bit base),
afinar_bf16 (02 --no-load-in-4bit: the fastest our pipeline picks), afinar_card16 (planned as a 16 GB fp16
card), afinar_curve_ref / afinar_curve_ours (first 50 losses of the reference path and ours, same data and seed).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FOUR_BIT_ANCHORS = {"hf", "unsloth", "unsloth_pack", "hf4_pack"}
# Issue 16: what a 16 GB card (Colab T4) can hold with room to spare.
CARD16_PEAK_GIB = 12.0


def load(folder: Path) -> tuple[list[dict], dict[str, dict]]:
    anchors, ours = [], {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "latest.json":
            continue
        data = json.loads(path.read_text())
        if "mode" not in data:
            continue
        if path.name.startswith("afinar_"):
            ours[path.stem.removeprefix("afinar_")] = data
        else:
            anchors.append(data)
    return anchors, ours


def label(anchor: dict) -> str:
    return f"{anchor['mode']} b{anchor['batch']}" + (f" {anchor['attn']}" if anchor.get("attn") else "")


def curve_comparison(ref: dict, ours: dict) -> dict | None:
    a, b = ref.get("losses") or [], ours.get("losses") or []
    n = min(len(a), len(b), 50)
    if n < 5:
        return None
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    # Noise: how much the reference itself moves from one step to the next (different batches).
    noise = statistics.pstdev([a[i + 1] - a[i] for i in range(n - 1)])
    return {"steps": n, "max_abs_diff": round(max(diffs), 4), "mean_abs_diff": round(sum(diffs) / n, 4),
            "reference_step_noise": round(noise, 4), "within_noise": max(diffs) <= max(noise, 1e-3),
            "reference_first_last": [a[0], a[n - 1]], "ours_first_last": [b[0], b[n - 1]]}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "?"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"


def main() -> None:
    folder = Path(sys.argv[1])
    anchors, ours = load(folder)
    rows = [(label(a), a["tok_per_s"], a["peak_gib"], "ancla") for a in anchors]
    rows += [(f"afinar {name} ({o['engine']}, {'nf4' if o['load_in_4bit'] else 'bf16'}, b{o['batch']})",
              o["tok_per_s"], o["peak_gib"], "nuestro") for name, o in ours.items()]
    best4 = max((a for a in anchors if a["mode"] in FOUR_BIT_ANCHORS), key=lambda a: a["tok_per_s"], default=None)
    best_any = max(anchors, key=lambda a: a["tok_per_s"], default=None)
    print(f"\n{'configuración':58s} {'tokens/s':>9s} {'pico GiB':>9s} {'x mejor 4 bits':>15s}")
    for name, tps, peak, _ in sorted(rows, key=lambda r: r[1]):
        ratio = f"{tps / best4['tok_per_s']:.2f}" if best4 else "-"
        print(f"{name:58s} {tps:9d} {peak:9.2f} {ratio:>15s}")

    default = ours.get("default")
    # What our pipeline can pick on this card: every run of the compiled or Unsloth engine at full size
    # (not the reference or the 16 GB simulation).
    candidates = [o for name, o in ours.items() if not name.startswith(("curve_ref", "card16")) and o["engine"] != "eager"]
    best_ours = max(candidates, key=lambda o: o["tok_per_s"], default=None)
    # The 16 GB plan (afinar_card16: EMULATE=t4 or MEM_GIB=15) against every anchor that stayed within 12 GiB.
    fits16 = [a for a in anchors if a["peak_gib"] <= CARD16_PEAK_GIB]
    best16 = max(fits16, key=lambda a: a["tok_per_s"], default=None)
    card16 = ours.get("card16")
    latest = {
        # Re-summarized away from the GPU (from files that came back), BENCH_DEVICE / BENCH_DATE say where and when.
        "device": os.environ.get("BENCH_DEVICE") or gpu_name(),
        "date": os.environ.get("BENCH_DATE") or time.strftime("%Y-%m-%d"),
        "project_tok_s": default["tok_per_s"] if default else None,
        "best_anchor_tok_s": best4["tok_per_s"] if best4 else None,
        "best_anchor": label(best4) if best4 else None,
        "ratio": round(default["tok_per_s"] / best4["tok_per_s"], 3) if default and best4 else None,
        "project_best_tok_s": best_ours["tok_per_s"] if best_ours else None,
        "project_best": best_ours["mode"] if best_ours else None,
        "best_anchor_any_tok_s": best_any["tok_per_s"] if best_any else None,
        "best_anchor_any": label(best_any) if best_any else None,
        "ratio_best": round(best_ours["tok_per_s"] / best_any["tok_per_s"], 3) if best_ours and best_any else None,
        "project_peak_gib_default": default["peak_gib"] if default else None,
        "project_peak_gib_16gb_card": card16["peak_gib"] if card16 else None,
        "project_tok_s_16gb_card": card16["tok_per_s"] if card16 else None,
        "best_anchor_16gb_tok_s": best16["tok_per_s"] if best16 else None,
        "best_anchor_16gb": f"{label(best16)} ({best16['peak_gib']} GiB)" if best16 else None,
        "ratio_16gb_card": round(card16["tok_per_s"] / best16["tok_per_s"], 3) if card16 and best16 else None,
        "project_16gb_within_12gib": card16["peak_gib"] <= CARD16_PEAK_GIB if card16 else None,
        "loss_curve": curve_comparison(ours["curve_ref"], ours["curve_ours"])
        if "curve_ref" in ours and "curve_ours" in ours else None,
        "anchors": {label(a): {"tok_s": a["tok_per_s"], "peak_gib": a["peak_gib"]} for a in anchors},
        "ours": {name: {k: o.get(k) for k in ("tok_per_s", "peak_gib", "engine", "load_in_4bit", "dequantize_4bit",
                                                 "compile", "attn", "loss_impl", "batch", "checkpointing",
                                                 "precision", "profile")} for name, o in ours.items()},
    }
    print(json.dumps({k: v for k, v in latest.items() if k not in ("anchors", "ours")}, indent=1, ensure_ascii=False))
    (folder / "latest.json").write_text(json.dumps(latest, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
