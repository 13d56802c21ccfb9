"""Generate colab.ipynb from the numbered scripts, so the notebook cannot drift from them.

    python tools/make_colab.py          # (re)write colab.ipynb
    python tools/make_colab.py --check  # exit 1 if colab.ipynb is not what the scripts generate

Every notebook parameter maps to a script flag: its default and the comment above it come from that
script's own argparse definition, and a flag that no longer exists stops the generation.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab.ipynb"
CELLS = ROOT / "tools" / "colab_cells"
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
    Param("PROBE_FILE", "--probe-file", ("02",), "Con otro tema, escribe tus propios pares en el mismo formato."),
    Param("MAX_NEW_TOKENS", "--max-new-tokens", ("02",), "La etapa 04 usa el mismo límite para comparar."),
    Param("DATASET", "--dataset", ("03",)),
    Param("MAX_STEPS", "--max-steps", ("03",)),
    Param("EPOCHS", "--epochs", ("03",)),
    Param("LEARNING_RATE", "--learning-rate", ("03",)),
    Param("BATCH_SIZE", "--batch-size", ("03",)),
    Param("LOGGING_STEPS", "--logging-steps", ("03",), "La curva de pérdida (loss.png) usa estas líneas."),
    Param("EVAL_STEPS", "--eval-steps", ("03",),
          "Con entradas apartadas (--eval-fraction), su pérdida aparece en metrics.jsonl y en loss.png."),
    Param("GGUF", "--gguf", ("04",)),
    Param("OVERWRITE", "--overwrite", ("02", "03", "04"),
          "True repite las tres etapas desde cero: la 02 borra el contenido de OUTPUT_DIR. Con False, «Ejecutar "
          "todo» sigue donde se quedó (tras una desconexión o un reinicio): se salta lo terminado según run.json "
          "y el entrenamiento continúa desde su último checkpoint."),
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


# ------------------------------------------------------------------------------------ the repository URL

_SCP_LIKE = re.compile(r"^(?:[\w.-]+@)?(?P<host>[\w.-]+):(?P<path>[^/].*)$")


def public_url(url: str) -> str:
    """The remote as Colab can clone it: https, with no user name or token in it.

    An ssh remote (git@github.com:ana/afinar.git) needs keys Colab does not have; an https remote may carry a
    token (https://ana:hf_...@github.com/...), which must never end up in a notebook that gets shared.
    """
    url = url.strip()
    scp = _SCP_LIKE.match(url)
    if scp and "://" not in url:
        return f"https://{scp['host']}/{scp['path']}"
    found = re.match(r"^(?P<scheme>[a-z+]+)://(?:[^@/]*@)?(?P<rest>.*)$", url)
    if not found:
        return url
    scheme = "https" if found["scheme"] in ("ssh", "git", "git+ssh", "http") else found["scheme"]
    return f"{scheme}://{found['rest']}"


def detect_repo_url(root: Path = ROOT) -> str:
    """`git remote get-url origin`, made public; "" when there is no git or no remote (the notebook then asks
    for a zip of the project, see tools/colab_cells/proyecto.py)."""
    try:
        done = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return public_url(done.stdout) if done.returncode == 0 and done.stdout.strip() else ""


def committed_repo_url(text: str) -> str | None:
    """The URL written in a generated notebook's parameters cell: --check compares against the notebook
    generated with it, because the detected one depends on where the repository was cloned from."""
    import ast
    import json

    cells = {cell.get("id"): cell for cell in json.loads(text).get("cells", [])}
    source = cells.get("parametros", {}).get("source", "")
    found = re.search(r'^REPO_URL = setting\("REPO_URL", (?P<value>.+)\)$', "".join(source), re.M)
    return ast.literal_eval(found["value"]) if found else None


# -------------------------------------------------------------------------------------------- the cells


def comment(text: str) -> list[str]:
    return textwrap.wrap(text, COMMENT_WIDTH - 2, initial_indent="# ", subsequent_indent="#   ",
                         break_on_hyphens=False)


def where(param: Param) -> str:
    names = [SCRIPTS[s][:2] if s != PUSH else "subida" for s in param.stages]
    return f" ({', '.join(names)})" if names else ""


def parameters_cell(resolved: list[ResolvedParam], repo_url: str) -> str:
    lines = [
        "# Parámetros: cámbialos aquí y vuelve a ejecutar esta celda. Cada uno es una opción de los scripts,",
        "# con el mismo valor por defecto; None deja que el script decida (a veces, según haya GPU o no).",
        f"# Las pruebas y las ejecuciones automáticas los sustituyen con variables de entorno {ENV_PREFIX}<NOMBRE>.",
        "import os",
        "",
        "",
        "def setting(name, default, kind=str):",
        f'    raw = os.environ.get("{ENV_PREFIX}" + name)',
        "    if raw is None or (not raw.strip() and kind is not str):",
        "        return default",
        "    raw = raw.strip()",
        "    if kind is bool:",
        '        return raw.lower() in ("1", "true", "yes", "si", "sí")',
        "    return kind(raw)",
        "",
        "",
        "# Google Drive: con True, OUTPUT_DIR queda en «Mi unidad/afinar/» y sobrevive a un reinicio del entorno",
        "# (que borra /content); «Ejecutar todo» continúa entonces donde se quedó. Drive se monta una sola vez.",
        'DRIVE_OUTPUT = setting("DRIVE_OUTPUT", False, bool)',
        "",
        "# De dónde sale el código en Colab (fuera de Colab se usa la carpeta actual), por este orden:",
        "# PROJECT_DRIVE_DIR: la carpeta del proyecto (o su zip) en Google Drive, p. ej. \"MyDrive/afinar\";",
        "# REPO_URL: el repositorio que se clona (" + ("tomado del repositorio al generar el cuaderno" if repo_url
                                                        else "vacío: el cuaderno se generó sin repositorio remoto")
        + ");",
        "# si no hay ninguno de los dos o la clonación falla (un repositorio privado), la celda pide un zip del",
        "# proyecto que subes desde el navegador.",
        'PROJECT_DRIVE_DIR = setting("PROJECT_DRIVE_DIR", None)',
        f'REPO_URL = setting("REPO_URL", {repo_url!r})',
        "# Carpeta local del entorno: /content en Colab (un reinicio la borra).",
        'WORK_DIR = setting("WORK_DIR", "/content")',
    ]
    for item in resolved:
        p = item.param
        lines.append("")
        lines += comment(f"{p.flag}{where(p)}: {item.help}")
        if p.note:
            lines += comment(p.note)
        kind = "" if item.kind is str else f", {item.kind.__name__}"
        lines.append(f'{p.name} = setting("{p.name}", {item.default!r}{kind})')
    lines += [
        "",
        "# La celda «Prueba el modelo» (al final): una pregunta con la respuesta en directo y, con TRY_CHAT = True,",
        "# un pequeño chat que termina con una línea vacía o «salir».",
        f'TRY_QUESTION = setting("TRY_QUESTION", {TRY_QUESTION!r})',
        'TRY_CHAT = setting("TRY_CHAT", True, bool)',
        "# Tokens máximos de cada respuesta de la prueba (un párrafo largo cabe en 300).",
        'TRY_MAX_NEW_TOKENS = setting("TRY_MAX_NEW_TOKENS", 300, int)',
    ]
    return "\n".join(lines)


TRY_QUESTION = "¿Por qué las mitocondrias tienen su propio ADN?"


PROJECT_CALL = """

PROJECT_DIR = open_project(REPO_URL, PROJECT_DRIVE_DIR, WORK_DIR)
os.chdir(PROJECT_DIR)
# The stage cells and the results cell import afinar from here.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))
if DRIVE_OUTPUT and in_colab():
    OUTPUT_DIR = output_on_drive(OUTPUT_DIR, WORK_DIR)
elif DRIVE_OUTPUT:
    print("DRIVE_OUTPUT = True solo tiene efecto en Colab: aquí la salida queda en", OUTPUT_DIR)
print("Carpeta de trabajo:", os.getcwd())
print("Carpeta de salida:", os.path.abspath(OUTPUT_DIR))
"""


def cell_file(name: str) -> str:
    """A cell kept as a real .py file in tools/colab_cells, without its module docstring (it explains the
    file to a reader of the repository; the notebook has its own Markdown cell above)."""
    import ast

    text = (CELLS / name).read_text(encoding="utf-8")
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        text = "\n".join(text.splitlines()[body[0].end_lineno:])
    return text.strip("\n") + "\n"


def project_cell() -> str:
    return cell_file("proyecto.py") + PROJECT_CALL


SETUP_CELL = 'run_stage("01_setup.sh")\n'

def push_cell(resolved: list[ResolvedParam]) -> str:
    # push_to_hub comes from the helpers cell (tools/colab_cells/auxiliares.py); it reads the token only if PUSH.
    return f"push_to_hub(PUSH, flags(\n{flag_pairs(resolved, PUSH, '    ')}\n))\n"


def results_cell() -> str:
    return cell_file("resultados.py") + "\n\nshow_results(OUTPUT_DIR)\n"


STEP_OF = {"02": "load", "03": "train", "04": "export"}


def flag_pairs(resolved: list[ResolvedParam], stage: str, indent: str, skip: tuple[str, ...] = ()) -> str:
    return "\n".join(f'{indent}("{r.param.flag}", {r.param.name}),' for r in resolved
                     if stage in r.param.stages and r.param.name not in skip)


def stage_cell(resolved: list[ResolvedParam], key: str) -> str:
    # --overwrite and --resume come from afinar.stages.colab.next_step, which reads run.json: the cell runs the stage
    # only if it is not finished, and an interrupted training continues from its last checkpoint.
    pairs = flag_pairs(resolved, key, "        ", skip=("OVERWRITE",))
    return (f'from afinar.stages.colab import announce, next_step\n\n'
            f'step = next_step(OUTPUT_DIR, "{STEP_OF[key]}", OVERWRITE)\n'
            f'if announce(step):\n'
            f'    run_stage("{SCRIPTS[key]}", *step.flags, *flags(\n{pairs}\n    ))\n')


TRY_CELL = """\
from afinar.stages.tryout import try_model

try_model(OUTPUT_DIR, TRY_QUESTION, chat=TRY_CHAT, max_new_tokens=TRY_MAX_NEW_TOKENS)
"""


INTRO = """\
# afinar en Colab: un asistente académico en español, afinado con tus datos

Este cuaderno afina con LoRA un modelo pequeño (Llama-3.2-1B-Instruct con Unsloth y la base en 4 bits) para
que responda bien, y en buen español, las preguntas que el modelo base contestaba mal (por defecto, de
ciencias de la vida; el tema y los datos los eliges tú). Ejecuta, una celda cada una, las cuatro etapas:

{stages}

**Antes de empezar:** menú *Entorno de ejecución → Cambiar tipo de entorno de ejecución → GPU T4*. Luego,
*Entorno de ejecución → Ejecutar todas*: no hace falta editar nada. Sin GPU también funciona, con el modelo
integrado SmolLM2-135M, pero mucho más despacio.

**Para no perder el trabajo:** pon `DRIVE_OUTPUT = True` en la celda de parámetros. La salida queda entonces en
Google Drive (*Mi unidad/afinar/*) y, tras una desconexión o un reinicio del entorno, basta con volver a
*Ejecutar todas*: lo terminado se salta y el entrenamiento sigue desde su último checkpoint.

Todo lo que se genera queda en la carpeta de salida (`salida/` por defecto), con su manifiesto `run.json`. Cada
etapa es el mismo script que en una terminal (`python 02_load_model.py --help` explica todas sus opciones).

*Este cuaderno se genera con `python tools/make_colab.py` a partir de los scripts: no lo edites a mano.*"""

HELPERS_MD = """\
## Funciones auxiliares

Cada etapa se ejecuta como un proceso aparte, igual que `!python 02_load_model.py`: así la memoria de la GPU
queda libre del todo entre una etapa y la siguiente, lo que instala `01_setup.sh` se usa sin reiniciar el
entorno y el fallo de una etapa no se lleva por delante las variables del cuaderno. La salida, barras de
progreso incluidas, aparece a medida que llega. Si una etapa falla, su mensaje (en español) dice qué hacer."""

PROJECT_MD = """\
## 1. Traer el proyecto (y montar Google Drive si lo pediste)

En Colab, el código se busca por este orden: la copia que ya está en `/content/afinar` (tras una desconexión),
la carpeta o el zip del proyecto en Google Drive (`PROJECT_DRIVE_DIR`), una copia de `REPO_URL` con `git clone`
y, si no hay dirección o la clonación falla (por ejemplo, porque el repositorio es privado), un zip del proyecto
que subes desde el navegador con el botón que aparece bajo la celda. Con `DRIVE_OUTPUT = True`, Drive se monta
aquí (una sola vez) y la salida va a *Mi unidad/afinar/*. Fuera de Colab se usa la carpeta actual: abre el
cuaderno desde la raíz del repositorio."""

SETUP_MD = """\
## 2. Preparar el entorno (`01_setup.sh`)

Detecta la GPU, instala las versiones fijadas (en una T4, la pila de Unsloth) y comprueba que todo funciona.
Es idempotente: repetirlo no reinstala lo que ya está bien. Tras un reinicio del entorno vuelve a instalar lo
que el reinicio borró. Termina con un resumen del entorno."""

SECRET_MD = """\
## 7. Subir el modelo al Hub de Hugging Face (opcional)

1. Crea un token con permiso de escritura en https://huggingface.co/settings/tokens.
2. En Colab, abre el panel **🔑 Secretos** de la barra lateral izquierda y pulsa *Añadir un secreto nuevo*.
   Nombre: `HF_TOKEN`; valor: el token.
3. Activa **Acceso del cuaderno** para ese secreto.
4. En la celda de parámetros pon `PUSH = True` y `REPO_ID = "usuario/nombre"`, ejecútala de nuevo y después
   ejecuta la celda siguiente.

El token solo se lee en la celda siguiente y solo si `PUSH` es `True`; pasa a la etapa 04 por el entorno de
ese proceso y nunca se imprime ni se guarda. No lo escribas nunca en una celda. Fuera de Colab vale también
`HF_TOKEN` en el entorno o la sesión de `hf auth login`. Antes de subir nada se comprueba que el token puede
escribir en `REPO_ID`. Si la subida falla, lo local queda intacto: vuelve a ejecutar la celda."""

RESULTS_MD = """\
## 6. Resultados

El informe de contraste (veredicto, métricas y las respuestas antes y después) y la curva de pérdida."""

TRY_MD = """\
## 8. Prueba el modelo

El modelo afinado responde a `TRY_QUESTION` y ves la respuesta a medida que se genera. Después, con
`TRY_CHAT = True`, puedes seguir preguntando en la casilla que aparece debajo: recuerda la conversación, y una
línea vacía o `salir` termina. Usa las mismas instrucciones de sistema, plantilla de chat y penalización de
repetición que el entrenamiento y el contraste (las que guarda `run.json`)."""

STAGE_TITLES = {"02": "## 3. Etapa 02: modelo base y respuestas «antes»",
                "03": "## 4. Etapa 03: revisar los datos y entrenar",
                "04": "## 5. Etapa 04: contraste, fusión y exportación"}


def stage_markdown(key: str, module: ModuleType) -> str:
    summary = script_summary(module)
    return (f"{STAGE_TITLES[key]}\n\n{summary[:1].upper()}{summary[1:]}\n\n"
            f"Si ya terminó (según `run.json`), la celda la salta; `OVERWRITE = True` la repite desde cero. "
            f"`python {SCRIPTS[key]} --help` lista todas sus opciones.")


def build_notebook(repo_url: str | None = None):
    """The notebook; `repo_url` None means the one detected from this clone's git remote."""
    import nbformat

    modules = {key: load_script(key) for key in SCRIPTS}
    parsers = {key: parser_of(module) for key, module in modules.items()}
    resolved = resolve_params(parsers)
    stages_list = "\n".join(
        ["1. `01_setup.sh`: prepara el entorno (versiones fijadas; en GPU, Unsloth)."]
        + [f"{i}. `{SCRIPTS[k]}`: {script_summary(modules[k])}" for i, k in enumerate(SCRIPTS, start=2)])
    url = detect_repo_url() if repo_url is None else repo_url

    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell(INTRO.replace("{stages}", stages_list), id="intro"),
        v4.new_code_cell(parameters_cell(resolved, url), id="parametros"),
        v4.new_markdown_cell(HELPERS_MD, id="auxiliares-md"),
        v4.new_code_cell(cell_file("auxiliares.py").rstrip("\n"), id="auxiliares"),
        v4.new_markdown_cell(PROJECT_MD, id="proyecto-md"),
        v4.new_code_cell(project_cell().rstrip("\n"), id="proyecto"),
        v4.new_markdown_cell(SETUP_MD, id="entorno-md"),
        v4.new_code_cell(SETUP_CELL.rstrip("\n"), id="entorno"),
    ]
    for key in SCRIPTS:
        cells.append(v4.new_markdown_cell(stage_markdown(key, modules[key]), id=f"etapa-{key}-md"))
        cells.append(v4.new_code_cell(stage_cell(resolved, key).rstrip("\n"), id=f"etapa-{key}"))
    # The try cell goes last: its chat waits for the user, and "Ejecutar todo" must have produced and shown
    # everything else before it does.
    cells += [
        v4.new_markdown_cell(RESULTS_MD, id="resultados-md"),
        v4.new_code_cell(results_cell().rstrip("\n"), id="resultados"),
        v4.new_markdown_cell(SECRET_MD, id="subida-md"),
        v4.new_code_cell(push_cell(resolved).rstrip("\n"), id="subida"),
        v4.new_markdown_cell(TRY_MD, id="prueba-md"),
        v4.new_code_cell(TRY_CELL.rstrip("\n"), id="prueba"),
    ]
    notebook = v4.new_notebook(cells=cells, metadata={
        "accelerator": "GPU",
        "colab": {"gpuType": "T4", "provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


def render(repo_url: str | None = None) -> str:
    """The notebook's exact file text."""
    import nbformat

    return nbformat.writes(build_notebook(repo_url)) + "\n"


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_argument("--check", action="store_true", help="solo comprobar que colab.ipynb está al día")
    options.add_argument("--repo-url", default=None,
                         help="repositorio que clona el cuaderno (por defecto: git remote get-url origin; sin "
                              "remoto, vacío, y el cuaderno pide un zip del proyecto)")
    args = options.parse_args(argv)
    current = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.exists() else None
    if args.check:
        # The URL is the one the notebook was generated with: a clone from elsewhere must not fail the check.
        text = render(args.repo_url if args.repo_url is not None
                      else (committed_repo_url(current) if current else None))
        if current != text:
            print(f"{NOTEBOOK.name} no coincide con los scripts: ejecuta python tools/make_colab.py", file=sys.stderr)
            return 1
        print(f"{NOTEBOOK.name} está al día.")
        return 0
    text = render(args.repo_url)
    if current == text:
        print(f"{NOTEBOOK.name} ya estaba al día.")
        return 0
    from afinar.core import atomic

    atomic.write_text(NOTEBOOK, text)
    url = committed_repo_url(text)
    print(f"Escrito {NOTEBOOK} (REPO_URL: {url or 'vacío; el cuaderno pedirá un zip del proyecto'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
