"""Generate colab.ipynb from the numbered scripts, so the notebook cannot drift from them.

    python tools/make_colab.py          # (re)write colab.ipynb
    python tools/make_colab.py --check  # exit 1 if colab.ipynb is not what the scripts generate

Every notebook parameter maps to a script flag: its default and the comment above it come from that
script's own argparse definition, and a flag that no longer exists stops the generation.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab.ipynb"
# Cloned only inside Colab; elsewhere the notebook runs from the repository it sits in.
REPO_URL = "https://github.com/USUARIO/afinar.git"
ENV_PREFIX = "AFINAR_"
COMMENT_WIDTH = 116

SCRIPTS = {"02": "02_load_model.py", "03": "03_train_model.py", "04": "04_inference_and_export.py"}
PUSH = "push"  # the push cell: stage 04 again, with --push-only


@dataclass(frozen=True)
class Param:
    """A notebook variable that becomes `flag` in the calls of `stages` (keys of SCRIPTS, or PUSH)."""

    name: str
    flag: str
    stages: tuple[str, ...]
    note: str = ""


PARAMS = (
    Param("OUTPUT_DIR", "--output-dir", ("02", "03", "04", PUSH)),
    Param("MODEL", "--model", ("02",), "None: el que elija la etapa 02 según haya GPU o no."),
    Param("LORA_R", "--lora-r", ("02",)),
    Param("MAX_SEQ_LENGTH", "--max-seq-length", ("02",), "La etapa 03 hereda el valor de la 02."),
    Param("QUESTIONS", "--questions", ("02",), "La etapa 04 usa las mismas (quedan anotadas en run.json)."),
    Param("MAX_NEW_TOKENS", "--max-new-tokens", ("02",), "La etapa 04 usa el mismo límite para comparar."),
    Param("DATASET", "--dataset", ("03",)),
    Param("MAX_STEPS", "--max-steps", ("03",)),
    Param("EPOCHS", "--epochs", ("03",)),
    Param("LEARNING_RATE", "--learning-rate", ("03",)),
    Param("BATCH_SIZE", "--batch-size", ("03",)),
    Param("LOGGING_STEPS", "--logging-steps", ("03",), "La curva de pérdida (loss.png) usa estas líneas."),
    Param("RESUME", "--resume", ("03",),
          "Tras una interrupción: pon True y ejecuta desde la etapa 02 (que entonces se salta)."),
    Param("GGUF", "--gguf", ("04",)),
    Param("OVERWRITE", "--overwrite", ("02", "03", "04"),
          "True repite las tres etapas desde cero: la 02 borra el contenido de OUTPUT_DIR."),
    Param("PUSH", "--push", (), "La celda de subida (al final) usa --push-only, con el secreto HF_TOKEN."),
    Param("REPO_ID", "--repo-id", ("04", PUSH), "La etapa 04 lo cita en las fichas del modelo."),
    Param("PRIVATE", "--private", (PUSH,)),
)


# ------------------------------------------------------------------------------------ reading the scripts


def load_script(key: str) -> ModuleType:
    """Import a numbered script as a module (its name starts with a digit, so `import` cannot)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    path = ROOT / SCRIPTS[key]
    spec = importlib.util.spec_from_file_location(f"afinar_script_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parser_of(module: ModuleType) -> argparse.ArgumentParser:
    # The scripts build their parser inside parse_args(); intercepting the final parse hands back the
    # parser itself, exactly as the script defines it, without touching the scripts.
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, *args, **kwargs: self):
        return module.parse_args([])


def find_action(parser: argparse.ArgumentParser, flag: str, script: str) -> argparse.Action:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    raise SystemExit(f"make_colab: {script} ya no tiene la opción {flag}; actualiza PARAMS en tools/make_colab.py.")


def kind_of(action: argparse.Action) -> type:
    if action.nargs == 0:
        return bool
    return action.type if action.type in (int, float) else str


@dataclass(frozen=True)
class ResolvedParam:
    param: Param
    default: object
    kind: type
    help: str


def resolve_params(parsers: dict[str, argparse.ArgumentParser]) -> list[ResolvedParam]:
    resolved = []
    for param in PARAMS:
        keys = [("04" if s == PUSH else s) for s in param.stages] or ["04"]
        actions = [find_action(parsers[k], param.flag, SCRIPTS[k]) for k in keys]
        kinds = {kind_of(a) for a in actions}
        if len(kinds) != 1:
            raise SystemExit(f"make_colab: {param.flag} tiene tipos distintos en {', '.join(keys)}.")
        first = actions[0]
        resolved.append(ResolvedParam(param, first.default, kinds.pop(), " ".join(first.help.split())))
    return resolved


def script_summary(module: ModuleType) -> str:
    """The first paragraph of a script's docstring, without its 'Etapa NN:' prefix."""
    return " ".join(module.__doc__.strip().split("\n\n")[0].split(":", 1)[-1].split())


# -------------------------------------------------------------------------------------------- the cells


def comment(text: str) -> list[str]:
    return textwrap.wrap(text, COMMENT_WIDTH - 2, initial_indent="# ", subsequent_indent="#   ",
                         break_on_hyphens=False)


def where(param: Param) -> str:
    names = [SCRIPTS[s][:2] if s != PUSH else "subida" for s in param.stages]
    return f" ({', '.join(names)})" if names else ""


def parameters_cell(resolved: list[ResolvedParam]) -> str:
    lines = [
        "# Parámetros: cámbialos aquí y vuelve a ejecutar esta celda. Cada uno es una opción de los scripts,",
        "# con el mismo valor por defecto; None deja que el script decida (a veces, según haya GPU o no).",
        f"# Las pruebas y las ejecuciones automáticas los sustituyen con variables de entorno {ENV_PREFIX}<NOMBRE>.",
        "import os",
        "",
        "",
        "def setting(name, default, kind=str):",
        f'    raw = os.environ.get("{ENV_PREFIX}" + name, "").strip()',
        "    if not raw:",
        "        return default",
        "    if kind is bool:",
        '        return raw.lower() in ("1", "true", "yes", "si", "sí")',
        "    return kind(raw)",
        "",
        "",
        "# Repositorio que se clona en Colab; fuera de Colab se usa la carpeta actual.",
        f'REPO_URL = setting("REPO_URL", {REPO_URL!r})',
    ]
    for item in resolved:
        p = item.param
        lines.append("")
        lines += comment(f"{p.flag}{where(p)}: {item.help}")
        if p.note:
            lines += comment(p.note)
        kind = "" if item.kind is str else f", {item.kind.__name__}"
        lines.append(f'{p.name} = setting("{p.name}", {item.default!r}{kind})')
    return "\n".join(lines)


HELPERS_CELL = '''\
import codecs
import os
import shlex
import signal
import subprocess
import sys


class StageFailed(Exception):
    """A stage ended with an error; its own message is already printed above, so no traceback."""

    def _render_traceback_(self):  # IPython shows these lines instead of a traceback
        return [f"ERROR: {self}"]


def flags(*pairs):
    """Command-line flags from (flag, value) pairs: None and False are left out, True is a bare flag."""
    argv = []
    for flag, value in pairs:
        if value is None or value is False or value == "":
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run_stage(script, *args, env=None):
    """Run one stage as its own process, showing its output (progress bars included) as it arrives."""
    program = ["bash"] if script.endswith(".sh") else [sys.executable, "-u"]
    print("$", "bash" if script.endswith(".sh") else "python", shlex.join([script, *args]), flush=True)
    # MPLBACKEND: the kernel's inline backend means nothing to a plain Python process.
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "MPLBACKEND": "Agg",
                 **(env or {})}
    process = subprocess.Popen([*program, script, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=child_env)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        # Raw chunks, not lines: progress bars redraw themselves with "\\r" and never end a line.
        while chunk := process.stdout.read1(65536):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)  # the stage stops cleanly and keeps its last checkpoint
        process.wait()
        raise
    if code != 0:
        raise StageFailed(f"{script} terminó con el código {code}; el motivo está en los mensajes de arriba.")
'''

CLONE_CELL = '''\
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules:
    repo = Path("/content") / Path(REPO_URL).stem
    if not (repo / "02_load_model.py").exists():
        cloned = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(repo)],
                                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        if cloned.returncode != 0:
            raise StageFailed(f"No se pudo clonar {REPO_URL}: revisa REPO_URL en la celda de parámetros.")
    os.chdir(repo)
elif not Path("02_load_model.py").exists():
    raise StageFailed(f"{os.getcwd()} no es la carpeta del repositorio: abre el cuaderno desde ella.")
# The results cell imports afinar from here.
if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
print("Carpeta de trabajo:", os.getcwd())
'''

SETUP_CELL = 'run_stage("01_setup.sh")\n'

PUSH_CELL = '''\
def colab_secret(name):
    from google.colab import userdata

    try:
        return userdata.get(name)
    except Exception as err:  # no such secret, or the notebook was not given access to it
        raise StageFailed(f"No se pudo leer el secreto {name} de Colab ({type(err).__name__}): créalo en el "
                          f"panel 🔑 con ese nombre y activa «Acceso del cuaderno».") from None


def push_to_hub():
    if not PUSH:
        print("PUSH = False: no se sube nada. Para publicar, sigue los pasos de arriba y pon PUSH = True.")
        return
    # The token goes only into the environment of this one child process: never printed, never a
    # notebook variable, never on a command line. Outside Colab, HF_TOKEN comes from the environment.
    env = {"HF_TOKEN": colab_secret("HF_TOKEN")} if "google.colab" in sys.modules else None
    run_stage("04_inference_and_export.py", "--push-only", *flags(
{push_flags}
    ), env=env)


push_to_hub()
'''

RESULTS_CELL = '''\
import html

from IPython.display import Image, display

from afinar.layout import OutputLayout

layout = OutputLayout.at(OUTPUT_DIR)
if layout.contrast_html.exists():
    report = layout.contrast_html.read_text(encoding="utf-8")
    # Inside an iframe: the report is a whole page with its own styles, which must not restyle the notebook.
    frame = f'<iframe srcdoc="{html.escape(report, quote=True)}" style="width:100%;height:720px;border:0"></iframe>'
    display({"text/html": frame}, raw=True)
    print("Informe:", layout.contrast_html, "y", layout.contrast_md)
else:
    print(f"Todavía no hay informe de contraste en {layout.contrast_html}: ejecuta la etapa 04.")
if layout.loss_plot.exists():
    display(Image(filename=str(layout.loss_plot)))
else:
    print(f"No hay curva de pérdida en {layout.loss_plot}: el entrenamiento no registró ningún paso "
          f"(ejecuta la etapa 03; con muy pocos pasos, baja LOGGING_STEPS).")
'''


def flag_pairs(resolved: list[ResolvedParam], stage: str, indent: str) -> str:
    return "\n".join(f'{indent}("{r.param.flag}", {r.param.name}),' for r in resolved if stage in r.param.stages)


def stage_cell(resolved: list[ResolvedParam], key: str) -> str:
    call = f'run_stage("{SCRIPTS[key]}", *flags(\n{flag_pairs(resolved, key, "    ")}\n))'
    if key != "02":
        return call + "\n"
    indented = textwrap.indent(call, "    ")
    return (f'if RESUME:\n    print("RESUME = True: se salta la etapa 02 y la 03 continúa desde el último checkpoint '
            f'de", OUTPUT_DIR)\nelse:\n{indented}\n')


INTRO = """\
# afinar en Colab: un asistente académico de ciencias de la vida, en español

Este cuaderno afina con LoRA un modelo pequeño (Llama-3.2-1B-Instruct con Unsloth y la base en 4 bits) para
que responda bien, y en buen español, las preguntas de biología que el modelo base contestaba mal. Ejecuta,
una celda cada una, las cuatro etapas del proyecto:

{stages}

**Antes de empezar:** menú *Entorno de ejecución → Cambiar tipo de entorno de ejecución → GPU T4*. Luego,
*Entorno de ejecución → Ejecutar todas*. Sin GPU también funciona, con el modelo integrado SmolLM2-135M, pero
mucho más despacio.

Todo lo que se genera queda en la carpeta de salida (`salida/` por defecto), con su manifiesto `run.json`. Cada
etapa es el mismo script que en una terminal (`python 02_load_model.py --help` explica todas sus opciones).

*Este cuaderno se genera con `python tools/make_colab.py` a partir de los scripts: no lo edites a mano.*"""

HELPERS_MD = """\
## Funciones auxiliares

Cada etapa se ejecuta como un proceso aparte, igual que `!python 02_load_model.py`: así la memoria de la GPU
queda libre del todo entre una etapa y la siguiente, lo que instala `01_setup.sh` se usa sin reiniciar el
entorno y el fallo de una etapa no se lleva por delante las variables del cuaderno. La salida, barras de
progreso incluidas, aparece a medida que llega. Si una etapa falla, su mensaje (en español) dice qué hacer."""

CLONE_MD = """\
## 1. Descargar el proyecto

En Colab se clona el repositorio en `/content` (si ya está, no se vuelve a clonar) y se entra en su carpeta.
Fuera de Colab se usa la carpeta actual: abre el cuaderno desde la raíz del repositorio."""

SETUP_MD = """\
## 2. Preparar el entorno (`01_setup.sh`)

Detecta la GPU, instala las versiones fijadas (en una T4, la pila de Unsloth) y comprueba que todo funciona.
Es idempotente: repetirlo no reinstala lo que ya está bien. Termina con un resumen del entorno."""

SECRET_MD = """\
## 6. Subir el modelo al Hub de Hugging Face (opcional)

1. Crea un token con permiso de escritura en https://huggingface.co/settings/tokens.
2. En Colab, abre el panel **🔑 Secretos** de la barra lateral izquierda y pulsa *Añadir un secreto nuevo*.
   Nombre: `HF_TOKEN`; valor: el token.
3. Activa **Acceso del cuaderno** para ese secreto.
4. En la celda de parámetros pon `PUSH = True` y `REPO_ID = "usuario/nombre"`, ejecútala de nuevo y después
   ejecuta la celda siguiente.

El token solo se lee en la celda siguiente y solo si `PUSH` es `True`; pasa a la etapa 04 por el entorno de
ese proceso y nunca se imprime ni se guarda. No lo escribas nunca en una celda. Fuera de Colab, exporta
`HF_TOKEN` antes de abrir el cuaderno. Si la subida falla, lo local queda intacto: vuelve a ejecutar la celda."""

RESULTS_MD = """\
## 7. Resultados

El informe de contraste (veredicto, métricas y las respuestas antes y después) y la curva de pérdida."""

STAGE_TITLES = {"02": "## 3. Etapa 02: modelo base y respuestas «antes»",
                "03": "## 4. Etapa 03: revisar los datos y entrenar",
                "04": "## 5. Etapa 04: contraste, fusión y exportación"}


def stage_markdown(key: str, module: ModuleType) -> str:
    summary = script_summary(module)
    return (f"{STAGE_TITLES[key]}\n\n{summary[:1].upper()}{summary[1:]}\n\n"
            f"`python {SCRIPTS[key]} --help` lista todas sus opciones.")


def build_notebook():
    import nbformat

    modules = {key: load_script(key) for key in SCRIPTS}
    parsers = {key: parser_of(module) for key, module in modules.items()}
    resolved = resolve_params(parsers)
    stages_list = "\n".join(
        ["1. `01_setup.sh`: prepara el entorno (versiones fijadas; en GPU, Unsloth)."]
        + [f"{i}. `{SCRIPTS[k]}`: {script_summary(modules[k])}" for i, k in enumerate(SCRIPTS, start=2)])

    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell(INTRO.replace("{stages}", stages_list), id="intro"),
        v4.new_code_cell(parameters_cell(resolved), id="parametros"),
        v4.new_markdown_cell(HELPERS_MD, id="auxiliares-md"),
        v4.new_code_cell(HELPERS_CELL.rstrip("\n"), id="auxiliares"),
        v4.new_markdown_cell(CLONE_MD, id="clonar-md"),
        v4.new_code_cell(CLONE_CELL.rstrip("\n"), id="clonar"),
        v4.new_markdown_cell(SETUP_MD, id="entorno-md"),
        v4.new_code_cell(SETUP_CELL.rstrip("\n"), id="entorno"),
    ]
    for key in SCRIPTS:
        cells.append(v4.new_markdown_cell(stage_markdown(key, modules[key]), id=f"etapa-{key}-md"))
        cells.append(v4.new_code_cell(stage_cell(resolved, key).rstrip("\n"), id=f"etapa-{key}"))
    cells += [
        v4.new_markdown_cell(SECRET_MD, id="subida-md"),
        v4.new_code_cell(PUSH_CELL.replace("{push_flags}", flag_pairs(resolved, PUSH, "        ")).rstrip("\n"),
                         id="subida"),
        v4.new_markdown_cell(RESULTS_MD, id="resultados-md"),
        v4.new_code_cell(RESULTS_CELL.rstrip("\n"), id="resultados"),
    ]
    notebook = v4.new_notebook(cells=cells, metadata={
        "accelerator": "GPU",
        "colab": {"gpuType": "T4", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


def render() -> str:
    """The notebook's exact file text."""
    import nbformat

    return nbformat.writes(build_notebook()) + "\n"


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_argument("--check", action="store_true", help="solo comprobar que colab.ipynb está al día")
    args = options.parse_args(argv)
    text = render()
    current = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.exists() else None
    if args.check:
        if current != text:
            print(f"{NOTEBOOK.name} no coincide con los scripts: ejecuta python tools/make_colab.py", file=sys.stderr)
            return 1
        print(f"{NOTEBOOK.name} está al día.")
        return 0
    if current == text:
        print(f"{NOTEBOOK.name} ya estaba al día.")
        return 0
    from afinar import atomic

    atomic.write_text(NOTEBOOK, text)
    print(f"Escrito {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
