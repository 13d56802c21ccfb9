"""Contrast answers of an already trained output folder at several repetition penalties (and limits).

    python bench/contrast_penalty_sweep.py 1.15 1.12 1.13           # folder: $RUN (default /tmp/d4)
    SHOW=1 python bench/contrast_penalty_sweep.py                    # 1.15 with 200 and 400 new tokens
Prints, per setting: answers that ended with EOS, worst repeated-3-gram ratio, answers above 10%, lowest
Spanish share. It reuses the adapter; nothing in the folder is written.
"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from afinar.train import modeling
from afinar.core.environment import detect_device
from afinar.evaluate.generation import generate_answers
from afinar.evaluate.questions import load_questions
from afinar.evaluate.contrast import answer_metrics
RUN = os.environ.get("RUN", "/tmp/d4")
m = json.load(open(Path(RUN) / "run.json"))
s = m["settings"]
model, tok = modeling.build(s, detect_device(), s.get("precision", "fp32"), adapter_dir=Path(RUN) / "adapter")
model.eval()
qs = load_questions(str(Path(__file__).resolve().parents[1] / "preguntas_contraste.json"))
for pen in [float(x) for x in sys.argv[1:]]:
    rows = generate_answers(model, tok, qs, max_new_tokens=200, batch_size=8, seed=s["seed"], repetition_penalty=pen)
    mets = [answer_metrics(r["text"], r["ended_with_eos"], getattr(q, "palabras_clave", None) or (q.get("palabras_clave", []) if isinstance(q, dict) else [])) for r, q in zip(rows, qs)]
    print(pen, "EOS", sum(r["ended_with_eos"] for r in rows), "worst3g", round(max(x["repeated_3gram_ratio"] for x in mets), 3),
          ">10%", sum(x["repeated_3gram_ratio"] > 0.10 for x in mets), "es_min", round(min(x["spanish_ratio"] for x in mets), 3), flush=True)
if os.environ.get("SHOW"):
    for mx in (200, 400):
        rows = generate_answers(model, tok, qs, max_new_tokens=mx, batch_size=8, seed=s["seed"], repetition_penalty=1.15)
        mets = [answer_metrics(r["text"], r["ended_with_eos"], []) for r in rows]
        print("max", mx, "EOS", sum(r["ended_with_eos"] for r in rows), "worst3g", round(max(x["repeated_3gram_ratio"] for x in mets), 3), "es_min", round(min(x["spanish_ratio"] for x in mets), 3))
        for r, x in zip(rows, mets):
            if not r["ended_with_eos"] or mx == 400:
                print("  ", r["ended_with_eos"], r["new_tokens"], round(x["repeated_3gram_ratio"], 3), r["text"][-160:].replace("\n", " "))
