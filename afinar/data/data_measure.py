"""Token lengths measured with the model's own tokenizer and chat template, the data report and histogram.

Lengths come from `prompts.tokenize_example` with no length limit, so they are exactly what training
would see before truncation: prompt tokens (system + user + assistant header) and response tokens
(answer + EOS). Percentiles use the nearest-rank method, so every reported value is a real length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from afinar.core import atomic
from afinar.core.prompts import IGNORE_INDEX, tokenize_example

UNLIMITED = 10**9
PERCENTILES = (50, 90, 95, 99)


def token_lengths(tokenizer, entries: list[dict]) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) per entry."""
    lengths = []
    for entry in entries:
        example = tokenize_example(tokenizer, entry, max_seq_length=UNLIMITED)
        response = sum(1 for label in example["labels"] if label != IGNORE_INDEX)
        lengths.append((len(example["input_ids"]) - response, response))
    return lengths


def describe(values: list[int]) -> dict[str, float | int]:
    """count, mean, nearest-rank percentiles, min and max."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    stats: dict[str, float | int] = {"count": len(ordered), "mean": round(sum(ordered) / len(ordered), 1)}
    for p in PERCENTILES:
        stats[f"p{p}"] = ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]
    stats["min"] = ordered[0]
    stats["max"] = ordered[-1]
    return stats


def token_summary(lengths: list[tuple[int, int]], flags: list[bool], max_seq_length: int) -> dict[str, Any]:
    totals = [p + r for p, r in lengths]
    summary: dict[str, Any] = describe(totals)
    summary["prompt"] = describe([p for p, _ in lengths])
    summary["response"] = describe([r for _, r in lengths])
    summary["max_seq_length"] = max_seq_length
    summary["truncated"] = sum(1 for t in totals if t > max_seq_length)
    summary["long"] = describe([t for t, f in zip(totals, flags) if f])
    summary["short"] = describe([t for t, f in zip(totals, flags) if not f])
    return summary


# --------------------------------------------------------------------------------------------------- histogram


def write_histogram(
    path: str | Path, values: list[int], flags: list[bool], unit: str, limit: int | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longs = [v for v, f in zip(values, flags) if f]
    shorts = [v for v, f in zip(values, flags) if not f]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    bins = min(60, max(10, len(values) // 5))
    top = max(values, default=1)
    edges = [top * i / bins for i in range(bins + 1)] if top > 0 else 10
    ax.hist([shorts, longs], bins=edges, stacked=True, color=["#4C72B0", "#DD8452"],
            label=[f"cortas ({len(shorts)})", f"largas ({len(longs)})"])
    if limit is not None:
        ax.axvline(limit, color="#C44E52", linestyle="--", label=f"max_seq_length = {limit}")
    ax.set_xlabel(f"Longitud por ejemplo ({unit})")
    ax.set_ylabel("Número de ejemplos")
    ax.set_title("Longitud de los ejemplos de entrenamiento")
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}".replace(".", ",")
    if isinstance(value, int):
        return f"{value:,}".replace(",", ".")
    return str(value)


def _share(value: float) -> str:
    return f"{value:.2f}".replace(".", ",")


def _stats_table(summary: dict[str, Any]) -> list[str]:
    rows = [("media", "mean"), ("p50", "p50"), ("p90", "p90"), ("p95", "p95"), ("p99", "p99"), ("máximo", "max")]
    lines = ["| | total | prompt | respuesta |", "|---|---:|---:|---:|"]
    for label, key in rows:
        cells = [summary.get(key), summary["prompt"].get(key), summary["response"].get(key)]
        lines.append(f"| {label} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


def render_report(summary: dict[str, Any], histogram_name: str | None = None) -> str:
    """The Spanish data report (Markdown) built from prepare()'s summary."""
    src = summary["source"]
    clean = summary["cleaning"]
    mix = summary["mix"]
    lines = ["# Informe de datos de entrenamiento", "", "## Origen", ""]
    kind = "lista JSON" if src["format"] == "json" else "JSON Lines"
    lines.append(f"- Archivo: `{src['path']}` ({kind}{', con BOM' if src.get('bom') else ''})")
    lines.append(f"- Entradas válidas leídas: {_fmt(src['entries'])} ({_fmt(src['with_input'])} con «input»)")
    for notice in summary.get("notices", []):
        lines.append(f"- Aviso: {notice}")
    lines += ["", "## Limpieza", ""]
    action = "Se conservan (--keep-duplicates)" if clean["keep_duplicates"] else "Se descartan"
    lines.append(f"- Duplicados exactos: {_fmt(clean['exact_duplicates'])}; casi duplicados "
                 f"(Jaccard ≥ {_share(clean['near_threshold'])} sobre grupos de {clean['shingle_words']} palabras): "
                 f"{_fmt(clean['near_duplicates'])}. {action}.")
    for item in clean.get("duplicate_examples", []):
        lines.append(f"  - {item}")
    language_action = "descartadas" if clean["drop_non_spanish"] else "solo marcadas (se entrenan igualmente)"
    lines.append(f"- Entradas que no parecen estar en español: {_fmt(clean['non_spanish'])}, {language_action}.")
    for item in clean.get("non_spanish_examples", []):
        lines.append(f"  - {item}")
    if summary.get("hub"):
        lines += ["", "## Conjuntos del Hub", "",
                  "| conjunto | filas | no válidas | cargadas | usadas |", "|---|---:|---:|---:|---:|"]
        for hub in summary["hub"]:
            cells = (hub["available"], hub["invalid"], hub["loaded"], hub["used"])
            lines.append(f"| `{hub['name']}` | " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
        lines.append(f"Proporción del Hub pedida: {_share(summary['hub_ratio'])}; "
                     f"obtenida: {_share(summary['hub_share'])}.")
    lines += ["", "## División y orden", ""]
    lines.append(f"- Entrenamiento: {_fmt(summary['train'])} ejemplos; evaluación (apartados, nunca se entrenan): "
                 f"{_fmt(summary['eval'])}.")
    lines.append(f"- Largas (respuesta ≥ {mix['long_min_words']} palabras): {_fmt(mix['long'])}; "
                 f"cortas: {_fmt(mix['short'])}; proporción de largas seguida: {_share(mix['ratio'])}.")
    if mix.get("repeated"):
        lines.append(f"- Para respetar mix_ratio se repiten {_fmt(mix['repeated'])} ejemplos del tipo escaso.")
    lines.append(f"- Intercalado: en cada ventana de {mix['window']} ejemplos seguidos la proporción de largas se "
                 f"desvía como mucho {_share(mix['worst_window_deviation'])} (cota teórica 1/{mix['window']}).")
    tokens = summary.get("tokens")
    if tokens and tokens.get("count"):
        lines += ["", "## Longitud en tokens (tokenizador y plantilla de chat del modelo)", ""]
        lines += _stats_table(tokens)
        lines.append("")
        lines.append(f"- Ejemplos que se truncarían con max_seq_length={tokens['max_seq_length']}: "
                     f"{_fmt(tokens['truncated'])}.")
        for kind, label in (("long", "largas"), ("short", "cortas")):
            part = tokens[kind]
            if part.get("count"):
                lines.append(f"- {label.capitalize()}: {_fmt(part['count'])} ejemplos, media {_fmt(part['mean'])} "
                             f"tokens, máximo {_fmt(part['max'])}.")
        packing = summary.get("packing")
        if packing:
            lines.append(f"- Empaquetado secuencial: {_fmt(packing['rows'])} filas de {tokens['max_seq_length']} "
                         f"tokens; en cada ventana de {packing['rows_per_window']} filas la proporción de largas "
                         f"se desvía como mucho {_share(packing['worst_window_share_deviation'])}.")
    else:
        lines += ["", "Sin tokenizador: no se han medido longitudes en tokens."]
    if histogram_name:
        lines += ["", f"![Histograma de longitudes]({histogram_name})"]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, summary: dict[str, Any], histogram_name: str | None = None) -> None:
    atomic.write_text(path, render_report(summary, histogram_name))
