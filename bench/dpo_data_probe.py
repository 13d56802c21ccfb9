"""Does more preference data move the misconception probe? DPO from one SFT adapter, one run per dataset.

    python bench/dpo_data_probe.py --adapter SALIDA/checkpoints/checkpoint-N \
        --dataset viejo=OLD.json --dataset nuevo=tu_dataset.json --probe sondas_errores.json --probe extra=FILE

Each run: the embedded base (fp32) + that SFT adapter, the training entries 03 would take from the dataset (same
cleaning, hold-out and order), 03's DPO phase with 03's CPU defaults, then every probe scored. The probes are scored
once on the SFT adapter as well ("sft"), so each run reads as before/after. One JSON with everything (--out).
SFT is not repeated: this isolates the preference data. Single process; set OMP_NUM_THREADS to share the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapter", required=True, help="carpeta de un adaptador LoRA tras el SFT (un checkpoint de 03)")
    p.add_argument("--dataset", action="append", required=True, help="NOMBRE=RUTA, una ejecución de DPO por cada uno")
    p.add_argument("--probe", action="append", default=[], help="[NOMBRE=]RUTA de pares de sonda (varias veces)")
    p.add_argument("--out", default="/tmp/dpo_data_probe.json")
    args = p.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core import settings
    from afinar.core.embedded import ensure_checkpoint
    from afinar.core.prompts import ensure_pad_token
    from afinar.data.pipeline import prepare
    from afinar.evaluate import probe
    from afinar.train.preference import train_preference

    base = ensure_checkpoint(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_pad_token(tokenizer)
    probes = {}
    for spec in args.probe or [str(ROOT / "sondas_errores.json")]:
        name, _, path = spec.rpartition("=")
        probes[name or Path(path).stem] = probe.load_pairs(path)
    defaults = {key: settings.default(key, "cpu") for key in
                ("max_seq_length", "dpo_beta", "preference_epochs", "preference_learning_rate", "seed")}
    report = {"adapter": args.adapter, "settings": defaults, "runs": {}}

    def load():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return PeftModel.from_pretrained(model, args.adapter, is_trainable=True)

    def scores(model):
        return {name: probe.score_pairs(model, tokenizer, pairs) for name, pairs in probes.items()}

    def save():
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    sft = scores(load())
    report["sft"] = {name: sum(r["true_wins"] for r in rows) for name, rows in sft.items()}
    print("SFT:", report["sft"], flush=True)
    save()
    for spec in args.dataset:
        name, _, path = spec.partition("=")
        started = time.perf_counter()
        prepared = prepare(path, tokenizer=tokenizer, max_seq_length=defaults["max_seq_length"], seed=defaults["seed"])
        model = load()
        metrics = train_preference(model, tokenizer, prepared.train, max_seq_length=defaults["max_seq_length"],
                                   beta=defaults["dpo_beta"], epochs=defaults["preference_epochs"],
                                   learning_rate=defaults["preference_learning_rate"], batch_size=8, sft_weight=1.0,
                                   seed=defaults["seed"])
        after = scores(model)
        report["runs"][name] = {
            "dataset": path, "train_entries": len(prepared.train), "dpo": metrics,
            "seconds": round(time.perf_counter() - started, 1),
            "probes": {probe_name: probe.summary(sft[probe_name], rows, probe_name)
                       for probe_name, rows in after.items()},
        }
        print(name, {k: f"{v['true_wins_before']} -> {v['true_wins_after']} de {v['pairs']}"
                     for k, v in report["runs"][name]["probes"].items()}, flush=True)
        save()


if __name__ == "__main__":
    main()
