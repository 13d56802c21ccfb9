"""What the CPU demo learns under several settings, in one process: held-out perplexity and the misconception probe.

The model is loaded once, the data prepared once (as stage 03 does), the base model's perplexity and probe
measured once; then each configuration gets a fresh adapter, the SFT of `afinar.train.training.train` and the DPO of
`afinar.train.preference`, and is scored like stage 04 scores it (no generation: EOS, Spanish and repetition need the
real 04, run on the winner). Configurations with the same --lora-layers share the stored frozen prefix
(afinar.train.frozen_prefix), so only the first pays for the layers below the adapter; its seconds say so.

    python bench/cpu_quality_sweep.py --out /tmp/quality.json \\
        "k4:K=4" "k4_lr3:K=4,lr=3e-3" "k8_e2:K=8,epochs=2,pe=3"

Keys: K (lora layers), r, alpha, lr, epochs, pe (preference epochs), plr (preference lr), beta, seq (max length),
short (1: train on the short entries only, the held-out split unchanged), warm (warmup ratio), sw (the SFT weight
of the preference loss), pbs (preference batch size), fe (epochs of a second SFT on the corrective entries
only, those with `rejected`, after the first), share (1, as 03 on CPU: the common prompt prefix once per packed row;
0: a copy per example, as before the tenth session), bs (rows per step), lpr (LoRA+: lora_B's learning rate over
lora_A's), seed (of the adapter's initialisation and the trainer; the data split stays seed 42), orpo (ORPO's beta
inside the SFT: the entries' `rejected` answers ride in their rows and lose by odds ratio; 0 = plain SFT), dup (each
corrective entry, those with `rejected`, N more times in the training list: more passes over the corrected facts
without a second phase). The key tc (a token contrast, a loser) needs commit b46423e.

--device cuda runs the same fp32 math on a GPU (TF32 off), to map quality against the token budget in seconds;
the CPU seconds are then estimated from the real tokens and pairs each configuration trains on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = {"K": 4, "r": 16, "alpha": 32, "lr": 2e-3, "epochs": 3.0, "pe": 2.0, "plr": 5e-4, "beta": 0.1,
            "seq": 640, "short": 0, "warm": 0.05, "sw": 1.0,
            "pbs": 8, "fe": 0.0, "share": 1, "bs": 4, "lpr": 1.0, "seed": 42, "orpo": 0.0, "dup": 0}


def parse(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    config = dict(DEFAULTS)
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        config[key] = type(DEFAULTS[key])(float(value)) if key in DEFAULTS else value
    return name, config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", default=str(ROOT / "tu_dataset.json"))
    parser.add_argument("--probe", default=str(ROOT / "sondas_errores.json"))
    parser.add_argument("--val-probe", default=str(ROOT / "bench" / "sondas_validacion.json"),
                        help="a second held-out probe, to choose levers without tuning on the reported one")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--questions", default=str(ROOT / "preguntas_contraste.json"),
                        help="also answer these as 04 does (200 new tokens, penalty 1.15): EOS and stated facts")
    parser.add_argument("--no-answers", action="store_true")
    parser.add_argument("--extra", help="more entries (Alpaca JSON) for the training split only: the held-out split "
                                        "stays that of --dataset, so perplexities compare with runs without them")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core import embedded
    from afinar.data.data_mix import LONG_MIN_WORDS, word_count
    from afinar.train import engine, frozen_prefix, modeling, preference
    from afinar.evaluate import facts, probe
    from afinar.evaluate.generation import generate_answers
    from afinar.data.pipeline import prepare
    from afinar.core.layout import OutputLayout
    from afinar.evaluate.perplexity import perplexity
    from afinar.core.prompts import ensure_pad_token
    from afinar.train.training import train

    path = str(embedded.checkpoint_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if args.device == "cuda":
        # The CPU demo computes in true fp32: TF32 matmuls would change what is measured.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        base = base.to("cuda")
    pairs = probe.load_pairs(args.probe)
    val_pairs = probe.load_pairs(args.val_probe)
    questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))
    results = {"threads": torch.get_num_threads(), "configs": []}
    out = Path(args.out)
    caches: dict[int, frozen_prefix.FrozenPrefix] = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(args.dataset, seed=42, tokenizer=tokenizer, max_seq_length=DEFAULTS["seq"],
                           layout=OutputLayout.at(Path(tmp) / "prep"))
        train_pool = prepared.train
        if args.extra:
            held = {" ".join(e["instruction"].split()) for e in prepared.eval}
            kept = [e for e in json.loads(Path(args.dataset).read_text(encoding="utf-8"))
                    if " ".join(e["instruction"].split()) not in held]
            merged = Path(tmp) / "merged.json"
            merged.write_text(json.dumps(kept + json.loads(Path(args.extra).read_text(encoding="utf-8")),
                                         ensure_ascii=False), encoding="utf-8")
            train_pool = prepare(merged, seed=42, tokenizer=tokenizer, max_seq_length=DEFAULTS["seq"],
                                 eval_fraction=0.0, layout=OutputLayout.at(Path(tmp) / "prep_extra")).train
            results["extra"] = {"path": args.extra, "train_entries": len(train_pool),
                                "without_extra": len(prepared.train)}
        started = time.perf_counter()
        results["ppl_before"] = perplexity(base, tokenizer, prepared.eval, max_seq_length=640, batch_size=4)
        results["probe_before"] = sum(r["true_wins"] for r in probe.score_pairs(base, tokenizer, pairs))
        results["val_probe_before"] = sum(r["true_wins"] for r in probe.score_pairs(base, tokenizer, val_pairs))
        results["before_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results), flush=True)
        for number, spec in enumerate(args.configs):
            name, c = parse(spec)
            model = modeling.add_lora(base, backend="hf", lora_r=int(c["r"]), lora_alpha=int(c["alpha"]),
                                      lora_dropout=0.0, seed=int(c["seed"]), lora_layers=int(c["K"]))
            start = frozen_prefix.first_adapted_layer(model)
            if start:
                caches.setdefault(start, frozen_prefix.FrozenPrefix(base, start))
                base._afinar_frozen_prefix = caches[start]
            train_entries = train_pool
            if c["short"]:
                train_entries = [e for e in train_entries if word_count(e["output"]) < LONG_MIN_WORDS]
            if c["dup"]:
                # Spread evenly through the stream (03 trains in stream order; extra copies at the end would be a
                # late second phase, the `fe` loser).
                extra = [e for e in train_entries if e.get("rejected")] * int(c["dup"])
                random.Random(int(c["seed"])).shuffle(extra)
                step = len(train_entries) / len(extra)
                mixed = list(train_entries)
                for k, e in reversed(list(enumerate(extra))):
                    mixed.insert(int(k * step) + 1, e)
                train_entries = mixed
            settings = {"max_seq_length": int(c["seq"]), "learning_rate": c["lr"], "epochs": c["epochs"],
                        "max_steps": None, "batch_size": int(c["bs"]), "grad_accum": 1, "seed": int(c["seed"]),
                        "warmup_ratio": c["warm"],
                        "save_steps": 10_000, "save_minutes": 10_000.0, "logging_steps": 10, "eval_steps": None,
                        "loraplus_lr_ratio": c["lpr"], "orpo_beta": c["orpo"]}
            t0 = time.perf_counter()
            metrics = train(model, tokenizer, train_entries, layout=OutputLayout.at(Path(tmp) / f"c{number}"),
                            settings=settings, precision="fp32", packing=True, open_rows=engine.CPU_OPEN_ROWS,
                            share_prefix=bool(c["share"]))
            if c["fe"] > 0:
                corrective = [e for e in train_entries if e.get("rejected")]
                metrics_fe = train(model, tokenizer, corrective, layout=OutputLayout.at(Path(tmp) / f"f{number}"),
                                   settings={**settings, "epochs": c["fe"]}, precision="fp32", packing=True,
                                   open_rows=engine.CPU_OPEN_ROWS, share_prefix=bool(c["share"]))
                metrics["real_tokens"] += metrics_fe["real_tokens"]
            t1 = time.perf_counter()
            pref = {"mode": "none"}
            if c["pe"] > 0:
                pref = preference.train_preference(model, tokenizer, train_entries, max_seq_length=int(c["seq"]),
                                                   beta=c["beta"], epochs=c["pe"], learning_rate=c["plr"],
                                                   batch_size=int(c["pbs"]), sft_weight=c["sw"], seed=42)
            t2 = time.perf_counter()
            base.__dict__.pop("_afinar_frozen_prefix", None)
            ppl = perplexity(model, tokenizer, prepared.eval, max_seq_length=640, batch_size=4)
            wins = [r for r in probe.score_pairs(model, tokenizer, pairs)]
            val_wins = sum(r["true_wins"] for r in probe.score_pairs(model, tokenizer, val_pairs))
            answers = {}
            if not args.no_answers:
                rows = generate_answers(model, tokenizer, [q["pregunta"] for q in questions], max_new_tokens=200,
                                        batch_size=16, seed=42, repetition_penalty=1.15)
                checked = [facts.check(r["text"], q["hecho"]) for r, q in zip(rows, questions) if q.get("hecho")]
                answers = {"eos": sum(r["ended_with_eos"] for r in rows), "answers": len(rows),
                           "facts": sum(check["passed"] for check in checked), "facts_total": len(checked),
                           "new_tokens": [r["new_tokens"] for r in rows]}
            row = {"name": name, **c, "sft_seconds": round(t1 - t0, 1), "pref_seconds": round(t2 - t1, 1),
                   "steps": metrics["global_step"], "final_loss": metrics["final_loss"],
                   "real_tokens": metrics["real_tokens"], "pref_pairs": pref.get("pairs"),
                   "pref_steps": pref.get("steps"),
                   "ppl_after": round(ppl, 3), "ppl_ratio": round(ppl / results["ppl_before"], 4),
                   "probe_after": sum(r["true_wins"] for r in wins), "probe_total": len(wins),
                   "probe_lost": sorted({r["tema"] for r in wins if not r["true_wins"]}),
                   "val_probe_after": val_wins, "val_probe_total": len(val_pairs),
                   "pref_train_correct": pref.get("train_pairs_correct_after"), **answers}
            results["configs"].append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            out.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
            base = model.unload()  # the base without LoRA layers, for the next configuration
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
