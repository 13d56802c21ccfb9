"""Notebook cell "resultados": show the contrast report and the loss curve of the output directory.

tools/make_colab.py pastes this file into the notebook, followed by the call with the parameters cell's
OUTPUT_DIR; it is a file of its own so that the linter and the tests read it like any other code.
"""

import html

from IPython.display import Image, display

from afinar.core.layout import OutputLayout


def show_results(output_dir):
    """The contrast report (in an iframe) and the loss curve of `output_dir`, or what is missing."""
    layout = OutputLayout.at(output_dir)
    if layout.contrast_html.exists():
        report = layout.contrast_html.read_text(encoding="utf-8")
        # Inside an iframe: the report is a whole page with its own styles, which must not restyle the notebook.
        frame = (f'<iframe srcdoc="{html.escape(report, quote=True)}" '
                 f'style="width:100%;height:720px;border:0"></iframe>')
        display({"text/html": frame}, raw=True)
        print("Informe:", layout.contrast_html, "y", layout.contrast_md)
    else:
        print(f"Todavía no hay informe de contraste en {layout.contrast_html}: ejecuta la etapa 04.")
    if layout.loss_plot.exists():
        display(Image(filename=str(layout.loss_plot)))
    else:
        print(f"No hay curva de pérdida en {layout.loss_plot}: el entrenamiento no registró ningún paso "
              f"(ejecuta la etapa 03; con muy pocos pasos, baja LOGGING_STEPS).")
