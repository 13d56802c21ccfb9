"""The misconception probe: does the model find the true statement more likely than the classic error?

Each pair of `sondas_errores.json` (written for this project and never trained on) has a question, a true
statement and the usual misconception, built alike and differing only in the key claim. Each statement is
scored as the model's answer to the question (summed log-probability of its tokens, EOS included); the pair
is won when the true one scores higher. Unlike keyword matching, this cannot be fooled by the right word in a
wrong sentence, and it needs no generation: the same model, with its adapter off and on, is scored on the
same tokens (before / after), as the held-out perplexity is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from afinar.core.errors import UserError
from afinar.core.models import model_device
from afinar.core.prompts import ensure_pad_token, tokenize_example
from afinar.evaluate.generation import _inference
from afinar.evaluate.logprobs import packed_logps, right_padded, sequence_logps

DEFAULT_PROBE_FILE = "sondas_errores.json"
MIN_PROBE_SHARE = 0.9  # the verdict's bar: the true statement wins on at least 90 % of the pairs
FIELDS = ("pregunta", "verdadera", "falsa")


def load_pairs(path: str | Path) -> list[dict[str, str]]:
    """Read and check the probe file; UserError naming the file, the pair and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No existe el archivo de la sonda de errores {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: no es JSON válido en UTF-8 ({err}).") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: debe ser una lista JSON no vacía de pares.")
    pairs = []
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise UserError(f"{path}, par {number}: debe ser un objeto con {', '.join(FIELDS)}.")
        for field in FIELDS:
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise UserError(f"{path}, par {number}, campo '{field}': falta o no es un texto.")
        if item["verdadera"].strip() == item["falsa"].strip():
            raise UserError(f"{path}, par {number}: 'verdadera' y 'falsa' son iguales.")
        pairs.append({"tema": str(item.get("tema", "")), **{f: item[f].strip() for f in FIELDS}})
    return pairs


def score_pairs(model, tokenizer, pairs: Sequence[dict[str, str]], *, max_seq_length: int = 512,
                batch_size: int = 8) -> list[dict[str, Any]]:
    """Per pair: log p(true), log p(false) as answers to the question, and whether the true one wins."""
    ensure_pad_token(tokenizer)
    rows = []
    for pair in pairs:
        for key in ("verdadera", "falsa"):
            rows.append(tokenize_example(tokenizer, {"instruction": pair["pregunta"], "output": pair[key]},
                                         max_seq_length))

    scores: list[float] = []
    with _inference(model):
        if model_device(model).type == "cpu":
            # Each pair's system prompt and question computed once (afinar.evaluate.logprobs.packed_logps): the
            # same scores, ~40 % faster. A GPU keeps the padded batches (Unsloth's attention and 4D masks).
            logps, _ = packed_logps(model, rows, [(i, i + 1) for i in range(0, len(rows), 2)],
                                    max_row_tokens=max_seq_length, pad_id=tokenizer.pad_token_id)
            scores = [float(v) for v in logps]
        else:
            for start in range(0, len(rows), batch_size * 2):
                batch = right_padded(rows[start:start + batch_size * 2], tokenizer.pad_token_id)
                scores += [float(v) for v in sequence_logps(model, batch)[0].float().cpu()]
    results = []
    for i, pair in enumerate(pairs):
        true_logp, false_logp = scores[2 * i], scores[2 * i + 1]
        results.append({"tema": pair.get("tema", ""), "pregunta": pair["pregunta"],
                        "logp_true": round(true_logp, 3), "logp_false": round(false_logp, 3),
                        "true_wins": true_logp > false_logp})
    return results


def summary(before: list[dict[str, Any]], after: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The probe as the contrast report shows it: shares before and after, and each pair."""
    n = len(after)
    won_before = sum(r["true_wins"] for r in before)
    won_after = sum(r["true_wins"] for r in after)
    return {
        "source": source, "pairs": n,
        "true_wins_before": won_before, "true_wins_after": won_after,
        "share_before": round(won_before / n, 4) if n else None,
        "share_after": round(won_after / n, 4) if n else None,
        "items": [{"tema": b["tema"], "pregunta": b["pregunta"], "before": b["true_wins"], "after": a["true_wins"],
                   "margin_before": round(b["logp_true"] - b["logp_false"], 3),
                   "margin_after": round(a["logp_true"] - a["logp_false"], 3)} for b, a in zip(before, after)],
    }
