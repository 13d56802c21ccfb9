"""Extrapolate a trained adapter (ExPO: Zheng et al., 2024): scale its LoRA delta by alpha and re-measure.

No training: the held-out perplexity, the misconception probe and the validation probe of an existing run's
adapter, with every LoRA scaling multiplied by each alpha (1 = the adapter as trained). --answers also
generates the contrast answers as 04 does (EOS and stated facts).

    python bench/extrapolate_adapter.py salida --alphas 1,1.5,2 --out /tmp/expo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an output directory of 03 (its adapter/ and datos/evaluacion.jsonl)")
    parser.add_argument("--alphas", default="1,1.25,1.5,2")
    parser.add_argument("--out")
    parser.add_argument("--answers", action="store_true")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from afinar.core import embedded
    from afinar.core.prompts import ensure_pad_token
    from afinar.evaluate import facts, probe
    from afinar.evaluate.generation import generate_answers
    from afinar.evaluate.perplexity import perplexity

    run = Path(args.run)
    path = str(embedded.checkpoint_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                      str(run / "adapter"))
    held_out = [json.loads(line) for line in (run / "datos" / "evaluacion.jsonl").read_text().splitlines() if line]
    pairs = probe.load_pairs(ROOT / "sondas_errores.json")
    val_pairs = probe.load_pairs(ROOT / "bench" / "sondas_validacion.json")
    questions = json.loads((ROOT / "preguntas_contraste.json").read_text(encoding="utf-8"))
    with model.disable_adapter():
        ppl_before = perplexity(model, tokenizer, held_out, max_seq_length=640, batch_size=4)
    trained = {name: dict(module.scaling) for name, module in model.named_modules()
               if isinstance(getattr(module, "scaling", None), dict)}
    results = {"run": str(run), "ppl_before": ppl_before, "rows": []}
    for alpha in (float(a) for a in args.alphas.split(",")):
        for name, module in model.named_modules():
            if name in trained:
                module.scaling.update({k: v * alpha for k, v in trained[name].items()})
        started = time.perf_counter()
        ppl = perplexity(model, tokenizer, held_out, max_seq_length=640, batch_size=4)
        wins = probe.score_pairs(model, tokenizer, pairs)
        row = {"alpha": alpha, "ppl_ratio": round(ppl / ppl_before, 4), "probe": sum(r["true_wins"] for r in wins),
               "probe_total": len(wins), "val_probe": sum(r["true_wins"] for r in probe.score_pairs(model, tokenizer,
                                                                                                   val_pairs)),
               "probe_lost": [i for i, r in enumerate(wins) if not r["true_wins"]]}
        if args.answers:
            answers = generate_answers(model, tokenizer, [q["pregunta"] for q in questions], max_new_tokens=200,
                                       batch_size=16, seed=42, repetition_penalty=1.15)
            row["eos"] = sum(a["ended_with_eos"] for a in answers)
            row["facts"] = sum(facts.check(a["text"], q["hecho"])["passed"]
                               for a, q in zip(answers, questions) if q.get("hecho"))
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
