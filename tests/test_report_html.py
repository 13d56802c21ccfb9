"""Contrast reports: JSON, Markdown, and the self-contained HTML rendered by a real headless Chromium."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from afinar.evaluate.contrast import build_contrast
from afinar.core.layout import OutputLayout
from afinar.evaluate.report import markdown_table, write_reports

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_TIMEOUT_S = 120

QUESTIONS = [
    {"pregunta": "¿De dónde procede el oxígeno de la fotosíntesis?", "palabras_clave": ["agua", "fotólisis"],
     "referencia": None},
    {"pregunta": "¿Qué hace la mitocondria? <b>negrita</b>", "palabras_clave": [], "referencia": None},
]
BEFORE = [
    ("El oxígeno es el código de la fotosíntesis, que es el código de la fotosíntesis, que es el código", False),
    ("The mitochondria is the powerhouse of the cell.", True),
]
AFTER = [
    ("El oxígeno procede del agua: la fotólisis en el fotosistema II la rompe y libera O2.", True),
    ("La mitocondria obtiene ATP mediante la respiración celular <script>alert('x')</script> & más.", True),
]


def rows(pairs):
    return [{"question": q["pregunta"], "text": t, "ended_with_eos": e, "new_tokens": 40, "seconds": 1.0}
            for q, (t, e) in zip(QUESTIONS, pairs)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    layout = OutputLayout.at(tmp_path_factory.mktemp("salida"))
    contrast = build_contrast(QUESTIONS, rows(BEFORE), rows(AFTER), 21.37, 12.04)
    write_reports(layout, contrast)
    return layout, contrast


def test_json_and_markdown_reports(written):
    layout, contrast = written
    assert json.loads(layout.contrast_json.read_text(encoding="utf-8")) == contrast
    md = layout.contrast_md.read_text(encoding="utf-8")
    table = markdown_table(contrast)
    assert table in md
    assert "| Perplejidad en el conjunto de evaluación | 21,37 | 12,04 | debe bajar | sí |" in table
    assert "| Respuestas que terminan con EOS | 1 de 2 (50 %) | 2 de 2 (100 %) | todas | sí |" in table
    assert "Veredicto: el modelo afinado está listo" in md
    assert "\\<script\\>" in md and "<script>" not in md, "model output is shown, not rendered"
    assert md.index("**Antes**") < md.index("**Después**")


def test_html_is_self_contained_and_escaped(written):
    layout, _ = written
    page = layout.contrast_html.read_text(encoding="utf-8")
    for external in ("http:", "https:", "<link", "<script", "<img", "src=", "@import", "url(", "@font-face"):
        assert external not in page.lower(), f"the report must not load anything: found {external!r}"
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; más" in page
    assert "¿Qué hace la mitocondria? &lt;b&gt;negrita&lt;/b&gt;" in page
    assert '<html lang="es">' in page


def chromium() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    pytest.fail("No se encuentra Chromium, necesario para comprobar el informe HTML. Instálalo con: "
                "apt-get update && apt-get install -y chromium")


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "perfil"
    profile.mkdir(exist_ok=True)
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


class TableCells(HTMLParser):
    """Collects the text of each cell of the table with id="metricas", row by row, and the answer texts."""

    def __init__(self):
        super().__init__()
        self.rows, self.answers = [], []
        self._in_table = False
        self._cell = None
        self._answer_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "metricas":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell = ""
        elif tag == "div" and attrs.get("class") == "text":
            self._answer_depth = 1
            self.answers.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "div" and self._answer_depth:
            self._answer_depth = 0

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._answer_depth:
            self.answers[-1] += data


@pytest.mark.slow
def test_chromium_renders_table_and_side_by_side_answers(written, tmp_path):
    layout, _ = written
    url = layout.contrast_html.resolve().as_uri()

    dumped = run_chromium(tmp_path, "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    parser = TableCells()
    parser.feed(dumped.stdout)
    assert parser.rows[0] == ["Métrica", "Antes", "Después", "Criterio", "¿Cumple?"]
    by_label = {row[0]: row[1:] for row in parser.rows[1:]}
    assert by_label["Perplejidad en el conjunto de evaluación"] == ["21,37", "12,04", "debe bajar", "sí"]
    assert by_label["Palabras en español"][1:] == ["100,0 %", "≥ 95 %", "sí"]
    assert by_label["3-gramas repetidos (peor respuesta)"][1] == "0,0 %"
    assert by_label["Cobertura de palabras clave (media)"][:2] == ["0,00", "1,00"]
    # Side by side: for each question, the "before" answer and then the "after" one, as text, not markup.
    assert parser.answers == [BEFORE[0][0], AFTER[0][0], BEFORE[1][0], AFTER[1][0]]

    shot = tmp_path / "shot.png"
    captured = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert captured.returncode == 0 and shot.exists(), captured.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, "a blank or single-colour page means the report did not render"
    # The verdict box is green when ready: look for its background (#e8f6ec) near the top of the page.
    top = (pixels[:400, :, :3] * 255).round().astype(int).reshape(-1, 3)
    assert (np.abs(top - [0xE8, 0xF6, 0xEC]).sum(axis=1) <= 3).sum() > 10_000



def test_reports_state_the_generation_settings_of_both_sides(tmp_path):
    from afinar.evaluate.report import markdown_report

    contrast = build_contrast(QUESTIONS, rows(BEFORE), rows(AFTER), 21.37, 12.04)
    assert "repetition_penalty" not in markdown_report(contrast), "nothing recorded, nothing claimed"
    contrast["generation"] = {"do_sample": False, "max_new_tokens": 200, "repetition_penalty": 1.1}
    layout = OutputLayout.at(tmp_path)
    write_reports(layout, contrast)
    for path in (layout.contrast_md, layout.contrast_html):
        text = path.read_text(encoding="utf-8")
        assert "antes y de después con los mismos ajustes" in text and "penalty 1.1" in text  # md escapes "_"
    contrast["generation"]["repetition_penalty"] = 1.0
    assert "sin penalización de repetición" in markdown_report(contrast)
