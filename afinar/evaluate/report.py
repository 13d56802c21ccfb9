"""Contrast reports: contraste.json, informe.md (terminal and model card) and a self-contained informe.html."""

from __future__ import annotations

import html
import re
from typing import Any

from afinar.core import atomic
from afinar.core.layout import OutputLayout
from afinar.evaluate.contrast import (
    criteria, MAX_REPEATED_3GRAM_RATIO, MIN_KEYWORD_COVERAGE, MIN_SPANISH_RATIO, number, percent,
)
from afinar.evaluate.probe import MIN_PROBE_SHARE

TITLE = "Prueba de contraste: antes y después del ajuste fino"
TABLE_HEADER = ("Métrica", "Antes", "Después", "Criterio", "¿Cumple?")


def write_reports(layout: OutputLayout, contrast: dict[str, Any]) -> None:
    """Write contraste.json, informe.md and informe.html into the contrast folder, each atomically."""
    atomic.write_json(layout.contrast_json, contrast)
    atomic.write_text(layout.contrast_md, markdown_report(contrast))
    atomic.write_text(layout.contrast_html, html_report(contrast))


# ------------------------------------------------------------------------------------------------- table


def metric_rows(contrast: dict[str, Any]) -> list[dict[str, Any]]:
    """The metric table shared by every report: label, before, after, criterion and passed (True/False/None)."""
    before, after = contrast["aggregate"]["before"], contrast["aggregate"]["after"]
    status = {key: passed for key, (passed, _) in criteria(contrast).items()}
    rows = [
        _row("Perplejidad en el conjunto de evaluación", number(contrast["perplexity"]["before"]),
             number(contrast["perplexity"]["after"]), "debe bajar", status["perplexity"]),
        _row("Respuestas que terminan con EOS", _share(before), _share(after), "todas", status["eos"]),
        _row("Palabras en español", percent(before["spanish_ratio"]), percent(after["spanish_ratio"]),
             f"≥ {percent(MIN_SPANISH_RATIO, 0)}", status["spanish"]),
        _row("3-gramas repetidos (peor respuesta)", percent(before["repeated_3gram_ratio_max"]),
             percent(after["repeated_3gram_ratio_max"]), f"≤ {percent(MAX_REPEATED_3GRAM_RATIO, 0)} por respuesta",
             status["repetition"]),
        _row("3-gramas repetidos (media)", percent(before["repeated_3gram_ratio_mean"]),
             percent(after["repeated_3gram_ratio_mean"]), "informativa", None),
    ]
    if contrast["aggregate"]["questions_with_keywords"]:
        rows.append(_row("Cobertura de palabras clave (media)", number(before["keyword_coverage_mean"]),
                         number(after["keyword_coverage_mean"]),
                         f"≥ {number(MIN_KEYWORD_COVERAGE)} y no peor que antes", status["keywords"]))
    if contrast["aggregate"].get("questions_with_facts"):
        rows.append(_row("Respuestas que afirman el hecho corregido (sin el error)", _facts_share(contrast, "before"),
                         _facts_share(contrast, "after"), "todas", status["facts"]))
    probe = contrast.get("probe")
    if probe and probe.get("pairs"):
        rows.append(_row("Sonda de errores: gana la afirmación verdadera",
                         f"{probe['true_wins_before']} de {probe['pairs']} ({percent(probe['share_before'], 0)})",
                         f"{probe['true_wins_after']} de {probe['pairs']} ({percent(probe['share_after'], 0)})",
                         f"≥ {percent(MIN_PROBE_SHARE, 0)} de los pares", status["probe"]))
    if before.get("new_tokens_mean") is not None or after.get("new_tokens_mean") is not None:
        rows.append(_row("Tokens generados por respuesta (media)", number(before.get("new_tokens_mean"), 1),
                         number(after.get("new_tokens_mean"), 1), "informativa", None))
    return rows


def _facts_share(contrast: dict[str, Any], side: str) -> str:
    checked = [item[side]["fact"] for item in contrast["questions"] if item[side].get("fact")]
    return f"{sum(1 for f in checked if f['passed'])} de {len(checked)}"


def probe_lines(contrast: dict[str, Any]) -> list[str]:
    """One Spanish line per probe pair: its topic and who won, before → after."""
    probe = contrast.get("probe") or {}
    won = {True: "verdadera", False: "error"}
    return [f"{item['tema'] or item['pregunta']}: gana la {won[item['before']]} → gana la {won[item['after']]} "
            f"(margen {number(item['margin_before'])} → {number(item['margin_after'])})"
            for item in probe.get("items", [])]


def passed_label(passed: bool | None) -> str:
    return {True: "sí", False: "no", None: "—"}[passed]


def verdict_title(contrast: dict[str, Any]) -> str:
    if contrast["verdict"]["ready"]:
        return "Veredicto: el modelo afinado está listo"
    return "Veredicto: el modelo afinado todavía no está listo"


# ---------------------------------------------------------------------------------------------- markdown


def markdown_table(contrast: dict[str, Any]) -> str:
    """The before → after metric table in Markdown, for informe.md and the model card."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in metric_rows(contrast):
        cells = [row["label"], row["before"], row["after"], row["criterion"], passed_label(row["passed"])]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_verdict(contrast: dict[str, Any]) -> str:
    lines = [f"**{verdict_title(contrast)}.**", ""]
    lines += [f"- {_md_inline(reason)}" for reason in contrast["verdict"]["reasons"]]
    return "\n".join(lines) + "\n"


def markdown_report(contrast: dict[str, Any]) -> str:
    parts = [
        f"# {TITLE}\n",
        markdown_verdict(contrast),
        "## Métricas (antes → después)\n",
        markdown_table(contrast),
        _md_inline(method_note(contrast)) + "\n",
        "## Respuestas, antes y después\n",
    ]
    for index, item in enumerate(contrast["questions"], start=1):
        parts.append(f"### {index}. {_md_inline(item['question'])}\n")
        for side, label in (("before", "Antes"), ("after", "Después")):
            answer = item[side]
            parts.append(f"**{label}** ({_badges_text(answer)}):\n")
            parts.append(_md_quote(answer["text"]) + "\n")
    if probe_lines(contrast):
        probe = contrast["probe"]
        parts.append(f"## Sonda de errores ({probe['pairs']} pares de `{_md_inline(probe['source'])}`)\n")
        parts.append("Para cada par, qué afirmación encuentra más probable el modelo como respuesta a la pregunta: "
                     "la verdadera o el error típico (logaritmo de la probabilidad de la frase; margen = verdadera "
                     "menos error). Ningún par se usó para entrenar.\n")
        parts += [f"- {_md_inline(line)}" for line in probe_lines(contrast)]
        parts.append("")
    return "\n".join(parts)


_METHOD_NOTE_MD = (
    "Perplejidad: solo sobre los tokens de respuesta de entradas que el entrenamiento no vio. Español: "
    "proporción de palabras en frases identificadas como español (py3langid por frases y, en frases muy "
    "cortas, palabras funcionales y tildes). 3-gramas repetidos: proporción de trigramas de palabras que "
    "repiten uno anterior de la misma respuesta.\n"
)


def method_note(contrast: dict[str, Any]) -> str:
    """How each metric is measured (plain text), naming the held-out set and the generation settings when the
    stage recorded them."""
    source = contrast.get("perplexity_source")
    where = f" ({source})" if source else ""
    note = _METHOD_NOTE_MD.replace("que el entrenamiento no vio.", f"que el entrenamiento no vio{where}.")
    generation = contrast.get("generation")
    if generation:
        note = note.rstrip("\n") + " " + generation_note(generation) + "\n"
    if contrast.get("preference"):
        note = note.rstrip("\n") + " " + preference_note(contrast["preference"]) + "\n"
    return note


def preference_note(preference: dict[str, Any]) -> str:
    """How stage 03 trained the preference of the corrected facts over the errors (its run.json record)."""
    pairs = preference.get("pairs") or 0
    if preference.get("mode") == "orpo":
        return (f"Entrenamiento: SFT con ORPO dentro de él (beta {preference.get('beta')}), con {pairs} pares "
                f"(respuesta correcta, error típico) de los datos.")
    if preference.get("mode") == "dpo":
        return f"Entrenamiento: SFT y después DPO con {pairs} pares (respuesta correcta, error típico) de los datos."
    return "Entrenamiento: solo SFT, sin entrenamiento de preferencias (03 --preference)."


def generation_note(generation: dict[str, Any]) -> str:
    """The decoding settings of both sides, in Spanish: the same for 'antes' and 'después'."""
    decoding = "muestreo" if generation.get("do_sample") else "decodificación voraz (greedy)"
    parts = [f"Respuestas de antes y de después con los mismos ajustes: {decoding}"]
    if generation.get("max_new_tokens"):
        parts.append(f"como mucho {generation['max_new_tokens']} tokens nuevos")
    penalty = generation.get("repetition_penalty", 1.0)
    if penalty and float(penalty) != 1.0:
        parts.append(f"repetition_penalty {penalty:g} (penalización suave, como la de Ollama, que usa 1.1 por "
                     f"defecto: rebaja los tokens ya presentes, prompt incluido, y no prohíbe repetir frases)")
    else:
        parts.append("sin penalización de repetición")
    return ", ".join(parts) + "."


def _md_cell(text: str) -> str:
    return _md_inline(text).replace("|", "\\|")


def _md_inline(text: str) -> str:
    # Model output may contain markup; escaped so it is shown, not rendered, on the Hub or GitHub.
    return re.sub(r"([\\`*_<>\[\]])", r"\\\1", " ".join(str(text).split()))


def _md_quote(text: str) -> str:
    if not text.strip():
        return "> *(respuesta vacía)*"
    lines = []
    for line in text.strip().splitlines():
        escaped = re.sub(r"([\\`*_<>\[\]|])", r"\\\1", line)
        escaped = re.sub(r"^(\s*)([#>+\-=]|\d+\.)", r"\1\\\2", escaped)
        lines.append(f"> {escaped}" if escaped.strip() else ">")
    return "\n".join(lines)


def _badges_text(answer: dict[str, Any]) -> str:
    badges = [
        "terminó con EOS" if answer["ended_with_eos"] else "cortada en el límite de tokens",
        f"español {percent(answer['spanish_ratio'], 0)}",
        f"3-gramas repetidos {percent(answer['repeated_3gram_ratio'], 0)}",
    ]
    if answer["keyword_coverage"] is not None:
        badges.append(f"palabras clave {number(answer['keyword_coverage'])}")
    fact = answer.get("fact")
    if fact:
        badges.append("afirma el hecho corregido" if fact["passed"] else
                      "repite el error" if fact["states_error"] else "no afirma el hecho corregido")
    return " · ".join(badges)


# -------------------------------------------------------------------------------------------------- html


def html_report(contrast: dict[str, Any]) -> str:
    """One HTML file with inline CSS only: no scripts, fonts, images or links to fetch."""
    ready = contrast["verdict"]["ready"]
    status = criteria(contrast)
    reasons = "".join(
        f'<li class="{_status_class(passed)}">{_e(reason)}</li>' for passed, reason in status.values()
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="es">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(TITLE)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_e(TITLE)}</h1>\n"
        f'<section id="veredicto" class="verdict {"ready" if ready else "not-ready"}">\n'
        f"<h2>{_e(verdict_title(contrast))}</h2>\n<ul>{reasons}</ul>\n</section>\n"
        '<section>\n<h2>Métricas (antes → después)</h2>\n'
        f"{_html_table(contrast)}\n<p class=\"note\">{_e(method_note(contrast).strip())}</p>\n</section>\n"
        '<section id="respuestas">\n<h2>Respuestas, antes y después</h2>\n'
        f"{''.join(_html_question(i, item) for i, item in enumerate(contrast['questions'], start=1))}"
        "</section>\n"
        + (f'<section id="sonda">\n<h2>Sonda de errores</h2>\n<ul>'
           + "".join(f"<li>{_e(line)}</li>" for line in probe_lines(contrast)) + "</ul>\n</section>\n"
           if probe_lines(contrast) else "")
        + "</main>\n</body>\n</html>\n"
    )


def _html_table(contrast: dict[str, Any]) -> str:
    head = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in TABLE_HEADER)
    body = []
    for row in metric_rows(contrast):
        body.append(
            f'<tr class="{_status_class(row["passed"])}"><th scope="row">{_e(row["label"])}</th>'
            f'<td class="before">{_e(row["before"])}</td><td class="after">{_e(row["after"])}</td>'
            f'<td>{_e(row["criterion"])}</td><td class="status">{_e(passed_label(row["passed"]))}</td></tr>'
        )
    return f'<table id="metricas" class="metrics">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + \
        "\n".join(body) + "\n</tbody>\n</table>"


def _html_question(index: int, item: dict[str, Any]) -> str:
    columns = "".join(
        f'<div class="answer {side}"><h4>{label}</h4><p class="badges">{_e(_badges_text(item[side]))}</p>'
        f'<div class="text">{_e(item[side]["text"]) or "<em>(respuesta vacía)</em>"}</div></div>'
        for side, label in (("before", "Antes"), ("after", "Después"))
    )
    return (f'<article class="question"><h3>{index}. {_e(item["question"])}</h3>'
            f'<div class="pair">{columns}</div></article>\n')


def _status_class(passed: bool | None) -> str:
    return {True: "pass", False: "fail", None: "info"}[passed]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _row(label: str, before: str, after: str, criterion: str, passed: bool | None) -> dict[str, Any]:
    return {"label": label, "before": before, "after": after, "criterion": criterion, "passed": passed}


def _share(side: dict[str, Any]) -> str:
    return f"{side['ended_with_eos']} de {side['answers']} ({percent(side['ended_with_eos_share'], 0)})"


# System font stacks only: the report must render offline, with nothing fetched.
_CSS = """
body{margin:0;background:#f6f7f9;color:#1d2430;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 16px}
h2{font-size:1.25rem;margin:24px 0 12px}
h3{font-size:1.05rem;margin:0 0 10px}
h4{margin:0 0 4px;font-size:.95rem;text-transform:uppercase;letter-spacing:.04em;color:#4a5568}
.verdict{border-radius:8px;padding:12px 18px;border:2px solid}
.verdict.ready{background:#e8f6ec;border-color:#2f855a}
.verdict.not-ready{background:#fdecec;border-color:#c53030}
.verdict h2{margin:4px 0 8px}
.verdict li{margin:4px 0}
li.pass::marker{content:"✔ ";color:#2f855a}
li.fail::marker{content:"✘ ";color:#c53030}
li.info::marker{content:"· ";color:#718096}
table.metrics{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.metrics th,.metrics td{border:1px solid #d8dde6;padding:8px 10px;text-align:left;vertical-align:top}
.metrics thead th{background:#2d3748;color:#fff}
.metrics td.before,.metrics td.after{font-variant-numeric:tabular-nums;white-space:nowrap}
.metrics tr.pass td.status{background:#c6f6d5;font-weight:600}
.metrics tr.fail td.status{background:#fed7d7;font-weight:600}
.note{color:#4a5568;font-size:.9rem}
.question{background:#fff;border-radius:8px;padding:14px 16px;margin:0 0 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.answer{border-left:4px solid #a0aec0;padding:4px 12px}
.answer.after{border-left-color:#3182ce}
.badges{margin:0 0 6px;font-size:.85rem;color:#4a5568}
.text{white-space:pre-wrap;overflow-wrap:anywhere}
@media (max-width:800px){.pair{grid-template-columns:1fr}}
"""
