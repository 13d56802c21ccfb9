"""The data pipeline the training script calls: check, clean, hold out, mix with the Hub, order, measure.

    check_only(path) -> str                      # --check-data: validation summary, no model needed
    prepare(path, ..., tokenizer, layout) -> PreparedData   # training data, report, eval split

Both raise UserError (Spanish, names file, position and field) for unusable input.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afinar.core import atomic
from afinar.core.errors import UserError
from afinar.data.data_check import plural, read_dataset
from afinar.data.data_clean import clean, CleanResult, LANGUAGE_MIN_PROBABILITY, NEAR_DUPLICATE_THRESHOLD, SHINGLE_WORDS
from afinar.data.data_measure import token_lengths, token_summary, write_histogram, write_report
from afinar.data.data_mix import (
    hold_out, interleave, long_flags, LONG_MIN_WORDS, packing_mix, word_count, worst_window_deviation,
)
from afinar.data.hub_datasets import HubEntries, HubSpec, load_hub_entries, parse_hub_spec

MAX_EXAMPLES_IN_REPORT = 10


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class PreparedData:
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    summary: dict[str, Any] = field(default_factory=dict)


def _share(value: float) -> str:
    return f"{value:.2f}".replace(".", ",")


# --------------------------------------------------------------------------------------------------- check only


def check_only(path: str | Path) -> str:
    """Validate and screen `path` without a model; return a one-paragraph Spanish summary."""
    checked = read_dataset(path)
    for notice in checked.notices:
        log(f"Aviso: {notice}")
    result = clean(checked.entries)
    flags = long_flags(checked.entries)
    n_long = sum(flags)
    median_words = f"{statistics.median(word_count(e['output']) for e in checked.entries):g}".replace(".", ",")
    kind = "lista JSON" if checked.format == "json" else "JSON Lines"
    bom = ", con BOM" if checked.had_bom else ""
    n = len(checked.entries)
    return (
        f"El archivo «{checked.path}» es válido: {plural(n, 'entrada')} en formato {kind}{bom}, "
        f"{checked.with_input} con campo «input». Respuestas largas (≥ {LONG_MIN_WORDS} palabras): {n_long}; "
        f"cortas: {n - n_long}; mediana de {median_words} palabras por respuesta. "
        f"Duplicados exactos: {len(result.exact)}; casi duplicados (Jaccard ≥ {_share(NEAR_DUPLICATE_THRESHOLD)}): "
        f"{len(result.near)}; al entrenar se descartan salvo con --keep-duplicates. "
        f"Entradas que no parecen estar en español: {len(result.non_spanish)} (se descartan con --drop-non-spanish). "
        f"Se puede usar para entrenar."
    )


# --------------------------------------------------------------------------------------------------- prepare


@dataclass
class _Pool:
    """Local entries first, then Hub entries; `origin[i]` is None for local, else the Hub set's index."""

    entries: list[dict[str, str]]
    origin: list[int | None]
    hubs: list[HubEntries]

    def label(self, index: int) -> str:
        """'entrada 7' for the local file, '«set» n.º 3' for a Hub set (built on demand, not per entry)."""
        hub = self.origin[index]
        if hub is None:
            return f"entrada {index + 1}"
        first = self.origin.index(hub)
        return f"«{self.hubs[hub].spec.name}» n.º {index - first + 1}"


def _load_hub(hub_specs: Iterable[str | HubSpec], seed: int) -> list[HubEntries]:
    loaded = []
    for raw in hub_specs:
        spec = raw if isinstance(raw, HubSpec) else parse_hub_spec(raw)
        log(f"Hub: cargando «{spec.label}» ...")
        hub = load_hub_entries(spec, seed=seed)
        for notice in hub.notices:
            log(f"Aviso: {notice}")
        log(f"Hub: «{spec.name}»: {plural(len(hub.entries), 'entrada válida', 'entradas válidas')}.")
        loaded.append(hub)
    return loaded


def _build_pool(local: list[dict], hubs: list[HubEntries]) -> _Pool:
    entries = list(local)
    origin: list[int | None] = [None] * len(local)
    for h, hub in enumerate(hubs):
        entries += hub.entries
        origin += [h] * len(hub.entries)
    return _Pool(entries, origin, hubs)


def _pick_hub(hub_indices: list[int], n_local_train: int, hub_ratio: float, seed: int) -> list[int]:
    """Hub entries so that they make `hub_ratio` of the training mix (all of them when there are too few)."""
    if not hub_indices or hub_ratio <= 0:
        return []
    wanted = round(hub_ratio / (1.0 - hub_ratio) * n_local_train)
    shuffled = list(hub_indices)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[:wanted])


def _cleaning_summary(result: CleanResult, pool: _Pool, keep_duplicates: bool, drop_non_spanish: bool) -> dict:
    duplicate_examples = [f"{pool.label(d.index)} repite {pool.label(d.kept)} (idéntica)" for d in result.exact]
    duplicate_examples += [
        f"{pool.label(d.index)} casi repite {pool.label(d.kept)} (similitud {_share(d.similarity)})"
        for d in result.near
    ]
    duplicate_examples = duplicate_examples[:MAX_EXAMPLES_IN_REPORT]
    non_spanish_examples = [
        f"{pool.label(f.index)}: idioma «{f.language}» (probabilidad {_share(f.probability)})"
        for f in result.non_spanish[:MAX_EXAMPLES_IN_REPORT]
    ]
    return {
        "exact_duplicates": len(result.exact),
        "near_duplicates": len(result.near),
        "near_threshold": NEAR_DUPLICATE_THRESHOLD,
        "shingle_words": SHINGLE_WORDS,
        "keep_duplicates": keep_duplicates,
        "duplicates_dropped": result.dropped_duplicates,
        "non_spanish": len(result.non_spanish),
        "non_spanish_min_probability": LANGUAGE_MIN_PROBABILITY,
        "drop_non_spanish": drop_non_spanish,
        "non_spanish_dropped": result.dropped_non_spanish,
        "duplicate_examples": duplicate_examples,
        "non_spanish_examples": non_spanish_examples,
    }


def _log_cleaning(result: CleanResult, keep_duplicates: bool, drop_non_spanish: bool) -> None:
    verb = "se conservan (--keep-duplicates)" if keep_duplicates else "se descartan"
    log(f"Limpieza: duplicados exactos: {len(result.exact)}; casi duplicados: {len(result.near)}; {verb}.")
    if result.non_spanish:
        verb = "se descartan" if drop_non_spanish else "solo se marcan (usa --drop-non-spanish para descartarlas)"
        log(f"Limpieza: entradas que no parecen estar en español: {len(result.non_spanish)}; {verb}.")


def _write_eval(layout, eval_entries: list[dict]) -> None:
    if eval_entries:
        atomic.write_jsonl(layout.eval_split, eval_entries)
    else:
        # A split left from an earlier run would hold entries that this run trains on.
        layout.eval_split.unlink(missing_ok=True)


def prepare(
    dataset_path: str | Path,
    *,
    hub_specs: Iterable[str | HubSpec] = (),
    hub_ratio: float = 0.3,
    keep_duplicates: bool = False,
    drop_non_spanish: bool = False,
    mix_ratio: float | None = None,
    window: int = 8,
    eval_fraction: float = 0.1,
    seed: int = 42,
    tokenizer=None,
    max_seq_length: int = 1024,
    layout=None,
) -> PreparedData:
    """Check, clean, hold out, mix and order the training data; write the report when `layout` is given."""
    if not 0.0 <= hub_ratio < 1.0:
        raise UserError(f"hub_ratio debe estar entre 0 y 1 (sin incluir el 1); se recibió {hub_ratio}.")
    if window < 1:
        raise UserError(f"La ventana del intercalado debe ser de al menos 1 ejemplo; se recibió {window}.")
    if mix_ratio is not None and not 0.0 < mix_ratio < 1.0:
        raise UserError(f"mix_ratio debe estar entre 0 y 1 (sin incluirlos); se recibió {mix_ratio}.")
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction debe estar entre 0 y 1 (sin incluir el 1); se recibió {eval_fraction}.")
    log(f"Datos: leyendo «{dataset_path}» ...")
    checked = read_dataset(dataset_path)
    log(f"Datos: {plural(len(checked.entries), 'entrada válida', 'entradas válidas')} "
        f"({'lista JSON' if checked.format == 'json' else 'JSON Lines'}).")
    for notice in checked.notices:
        log(f"Aviso: {notice}")
    hubs = _load_hub(hub_specs, seed)
    if hubs and hub_ratio == 0:
        log("Aviso: hub_ratio=0: no se usa ninguna entrada del Hub.")
    pool = _build_pool(checked.entries, hubs)
    notices = list(checked.notices) + [n for hub in hubs for n in hub.notices]

    result = clean(pool.entries, keep_duplicates=keep_duplicates, drop_non_spanish=drop_non_spanish)
    _log_cleaning(result, keep_duplicates, drop_non_spanish)
    local = [i for i in result.kept if pool.origin[i] is None]
    if not local:
        raise UserError(f"Después de la limpieza no queda ninguna entrada de «{dataset_path}» para entrenar.")

    local_entries = [pool.entries[i] for i in local]
    train_pos, eval_pos = hold_out(local_entries, eval_fraction, seed)
    eval_entries = [local_entries[i] for i in eval_pos]
    local_train = [local[i] for i in train_pos]
    if eval_fraction > 0:
        log(f"Evaluación: {plural(len(eval_entries), 'entrada apartada', 'entradas apartadas')} "
            "(no se usan para entrenar).")

    hub_kept = [i for i in result.kept if pool.origin[i] is not None]
    hub_used = _pick_hub(hub_kept, len(local_train), hub_ratio, seed)
    train_pool = [pool.entries[i] for i in local_train + hub_used]
    mix = interleave(train_pool, mix_ratio=mix_ratio, seed=seed)
    worst = worst_window_deviation(mix.flags, mix.ratio, window)
    n_long = sum(long_flags(train_pool))
    log(f"Intercalado: {n_long} largas y {len(train_pool) - n_long} cortas; proporción de largas "
        f"{_share(mix.ratio)}; peor ventana de {window}: desviación {_share(worst)}.")

    summary: dict[str, Any] = {
        "source": {
            "path": str(dataset_path),
            "format": checked.format,
            "bom": checked.had_bom,
            "entries": sum(1 for origin in pool.origin if origin is None),
            "with_input": checked.with_input,
        },
        "notices": notices,
        "cleaning": _cleaning_summary(result, pool, keep_duplicates, drop_non_spanish),
        "train": len(mix.order),
        "train_unique": len(train_pool),
        "eval": len(eval_entries),
        "eval_fraction": eval_fraction,
        "seed": seed,
        "mix": {
            "long_min_words": LONG_MIN_WORDS,
            "long": n_long,
            "short": len(train_pool) - n_long,
            "mix_ratio": mix_ratio,
            "ratio": round(mix.ratio, 4),
            "repeated": mix.repeated,
            "window": window,
            "worst_window_deviation": round(worst, 4),
        },
    }
    if hubs:
        summary["hub"] = [
            {
                "name": hub.spec.name,
                "limit": hub.spec.limit,
                "available": hub.available,
                "invalid": hub.invalid,
                "loaded": len(hub.entries),
                "used": sum(1 for i in hub_used if pool.origin[i] == h),
            }
            for h, hub in enumerate(hubs)
        ]
        summary["hub_ratio"] = hub_ratio
        summary["hub_share"] = round(len(hub_used) / len(train_pool), 4) if train_pool else 0.0
        if hub_used and len(hub_used) < round(hub_ratio / (1.0 - hub_ratio) * len(local_train)):
            log(f"Aviso: no hay entradas del Hub suficientes para hub_ratio={hub_ratio}; "
                f"se usan todas ({len(hub_used)}), un {summary['hub_share']:.0%} de la mezcla.")

    totals = None
    summary["tokens"] = None
    if tokenizer is not None:
        totals = _measure_tokens(summary, train_pool, mix, tokenizer, max_seq_length, window)
    if layout is not None:
        _write_outputs(layout, summary, train_pool, eval_entries, totals, max_seq_length)
    return PreparedData(train=mix.order, eval=eval_entries, summary=summary)


def _measure_tokens(
    summary: dict, train_pool: list[dict], mix, tokenizer, max_seq_length: int, window: int
) -> list[int]:
    """Fill summary["tokens"] and summary["packing"]; return the total length of each train_pool entry."""
    log("Tokens: midiendo longitudes con el tokenizador y la plantilla de chat del modelo ...")
    lengths = token_lengths(tokenizer, train_pool)
    flags = long_flags(train_pool)
    tokens = token_summary(lengths, flags, max_seq_length)
    summary["tokens"] = tokens
    totals = [p + r for p, r in lengths]
    # mix.order may repeat entries (mix_ratio); identity maps each position back to its measured entry.
    by_id = {id(entry): total for entry, total in zip(train_pool, totals)}
    order_lengths = [by_id[id(entry)] for entry in mix.order]
    summary["packing"] = packing_mix(
        order_lengths, mix.flags, max_seq_length, rows_per_window=max(1, window // 2), ratio=mix.ratio
    )
    log(f"Tokens: p50 {tokens['p50']}, p95 {tokens['p95']}, máximo {tokens['max']}; "
        f"{plural(tokens['truncated'], 'ejemplo')} se truncarían con max_seq_length={max_seq_length}.")
    return totals


def _write_outputs(
    layout, summary: dict, train_pool: list[dict], eval_entries: list[dict], totals: list[int] | None,
    max_seq_length: int,
) -> None:
    _write_eval(layout, eval_entries)
    flags = long_flags(train_pool)
    if totals is not None:
        write_histogram(layout.data_histogram, totals, flags, "tokens", limit=max_seq_length)
    else:
        words = [word_count(e["instruction"]) + word_count(e["input"]) + word_count(e["output"]) for e in train_pool]
        write_histogram(layout.data_histogram, words, flags, "palabras")
    summary["report"] = str(layout.data_report)
    summary["histogram"] = str(layout.data_histogram)
    summary["eval_split"] = str(layout.eval_split) if eval_entries else None
    write_report(layout.data_report, summary, histogram_name=layout.data_histogram.name)
    log(f"Datos: informe en {layout.data_report}")
