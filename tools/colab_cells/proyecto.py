"""Notebook cell "proyecto": get the project's code into the runtime, and put OUTPUT_DIR on Drive if asked.

tools/make_colab.py pastes this file into the notebook, followed by the call that uses the parameters cell's
variables; it is a file of its own so that the linter and the tests read it like any other code. Only the
standard library: nothing of the project can be imported before the project is here.

In Colab, in this order: the copy left by an earlier run (a disconnect keeps /content), a folder or zip on
Google Drive (PROJECT_DRIVE_DIR), a clone of REPO_URL, and, when there is no URL or the clone fails (a private
repository, no network), a zip uploaded from the browser. Outside Colab the notebook runs from the repository
it was opened in.
"""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MARK = "02_load_model.py"  # the file that says a folder is the project
PROJECT_NAME = "afinar"
# Never copied from a Drive folder: an old output or a git history would only slow the copy down.
SKIPPED = (".git", "salida", "__pycache__", ".pytest_cache")


class ProjectMissing(Exception):
    """The project could not be brought here; the message says what to do (no traceback in the notebook)."""

    def _render_traceback_(self):
        return [f"ERROR: {self}"]


def in_colab():
    return "google.colab" in sys.modules


def mount_drive(work_dir):
    """Mount Google Drive once at <work_dir>/drive and return its MyDrive folder."""
    mount = Path(work_dir) / "drive"
    my_drive = mount / "MyDrive"
    if not my_drive.is_dir():  # mounted already (this session): mounting again would ask for access again
        from google.colab import drive

        drive.mount(str(mount))
    if not my_drive.is_dir():
        raise ProjectMissing(f"Google Drive no quedó montado en {mount}: vuelve a ejecutar la celda y acepta "
                             f"el acceso a Drive.")
    return my_drive


def find_project(folder):
    """The folder holding MARK: `folder` itself or one level down (GitHub's zips add 'afinar-main/')."""
    folder = Path(folder)
    if (folder / MARK).is_file():
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir() and (p / MARK).is_file()] if folder.is_dir() else []
    return inner[0] if len(inner) == 1 else None


def extract_zip(data, target, name="el zip"):
    """Unpack a project zip (bytes) into `target`; refuse anything that is not the project."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ProjectMissing(f"{name} no es un archivo zip válido: comprime la carpeta del proyecto (la que "
                             f"contiene {MARK}) y súbela de nuevo.") from None
    with archive, tempfile.TemporaryDirectory(dir=Path(target).parent) as tmp:
        for member in archive.namelist():
            # A name that climbs out of the folder (../, /etc) would write outside it.
            if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                raise ProjectMissing(f"{name} contiene una ruta no permitida ({member}): súbelo de nuevo.")
        archive.extractall(tmp)
        found = find_project(tmp)
        if found is None:
            raise ProjectMissing(f"{name} no contiene el proyecto: falta {MARK}. Comprime la carpeta del "
                                 f"proyecto entera y súbela de nuevo.")
        shutil.move(str(found), str(target))
    return target


def copy_from_drive(source, target):
    source = Path(source)
    if source.is_file() and source.suffix == ".zip":
        return extract_zip(source.read_bytes(), target, str(source))
    project = find_project(source) if source.is_dir() else None
    if project is None:
        raise ProjectMissing(f"PROJECT_DRIVE_DIR: {source} no es la carpeta del proyecto (no contiene {MARK}) "
                             f"ni un zip. Sube el proyecto a Drive y pon aquí su ruta, p. ej. «MyDrive/afinar».")
    shutil.copytree(project, target, ignore=shutil.ignore_patterns(*SKIPPED))
    return target


def clone(repo_url, target):
    """git clone; None on success, else the Spanish reason (a private repository looks like a missing one)."""
    # No terminal prompt: a private repository must fail at once instead of waiting for a password.
    done = subprocess.run(["git", "clone", "--depth", "1", repo_url, str(target)], capture_output=True, text=True,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if done.returncode == 0:
        return None
    shutil.rmtree(target, ignore_errors=True)
    lines = (done.stderr or "").strip().splitlines()
    detail = lines[-1] if lines else f"git terminó con el código {done.returncode}"
    return (f"No se pudo clonar {repo_url} ({detail}). "
            f"Si el repositorio es privado, Colab no tiene tus credenciales de GitHub y no puede clonarlo; si no, "
            f"revisa REPO_URL y la conexión.")


def upload_zip(target):
    from google.colab import files

    print(f"Sube un zip del proyecto (la carpeta que contiene {MARK}; en GitHub: Code → Download ZIP) con el "
          f"botón «Elegir archivos» que aparece debajo.", flush=True)
    uploaded = files.upload() or {}
    zips = {name: data for name, data in uploaded.items() if name.lower().endswith(".zip")}
    if not zips:
        raise ProjectMissing("No se subió ningún archivo .zip. Vuelve a ejecutar esta celda y elige el zip del "
                             "proyecto, o pon en PROJECT_DRIVE_DIR la carpeta del proyecto en Google Drive.")
    name, data = next(iter(zips.items()))
    for other in uploaded:  # files.upload also leaves a copy in the working folder; it is not needed there
        Path(other).unlink(missing_ok=True)
    return extract_zip(data, target, name)


def open_project(repo_url, drive_project, work_dir):
    """Bring the project into <work_dir>/afinar (in Colab) and return the folder to work in."""
    if not in_colab():
        here = Path.cwd()
        if not (here / MARK).is_file():
            raise ProjectMissing(f"{here} no es la carpeta del proyecto: abre el cuaderno desde ella.")
        return here
    target = Path(work_dir) / PROJECT_NAME
    if (target / MARK).is_file():
        print(f"El proyecto ya está en {target} (de antes de una desconexión): se usa esa copia.")
        return target
    if target.exists():
        shutil.rmtree(target)  # a half-copied folder from an interrupted attempt
    target.parent.mkdir(parents=True, exist_ok=True)
    if drive_project:
        source = Path(drive_project)
        if not source.is_absolute():
            source = mount_drive(work_dir).parent / source
        print(f"Copiando el proyecto desde Google Drive ({source}) ...", flush=True)
        return copy_from_drive(source, target)
    if repo_url:
        print(f"Clonando {repo_url} ...", flush=True)
        why = clone(repo_url, target)
        if why is None:
            return target
        print(why + "\nEn su lugar, sube un zip del proyecto.", flush=True)
    else:
        print("No hay REPO_URL (el cuaderno se generó sin un repositorio remoto).", flush=True)
    return upload_zip(target)


def output_on_drive(output_dir, work_dir):
    """OUTPUT_DIR inside MyDrive/afinar, so run.json and the checkpoints outlive a runtime reset."""
    my_drive = mount_drive(work_dir)
    path = Path(output_dir)
    if path.is_absolute() and (path == my_drive or my_drive in path.parents):
        return str(path)  # this cell ran before: already on Drive
    if path.is_absolute():
        raise ProjectMissing(f"DRIVE_OUTPUT = True pide una carpeta relativa en OUTPUT_DIR (p. ej. «salida») y "
                             f"es {output_dir}; o pon DRIVE_OUTPUT = False.")
    return str(my_drive / PROJECT_NAME / path)
