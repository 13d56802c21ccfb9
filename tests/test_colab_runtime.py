"""colab.ipynb as it runs in Colab: a stand-in google.colab module, the zip fallback, Drive, a reset.

The committed notebook is executed with nbclient in a kernel that has a stand-in `google.colab` imported
(as Colab's runtime has the real one): `drive.mount` links a folder that outlives the "runtime", `files.upload`
hands back a zip of this working tree (as GitHub's "Download ZIP" makes it: everything under one folder),
`userdata.get` reads planted secrets, and `input()` answers with scripted lines. /content is a temporary folder
(WORK_DIR). Three sessions:

1. a clone that fails (no URL reachable: what a private repository looks like), the zip fallback, the output on
   Drive, and only stage 02;
2. a reset (the local copy is deleted, Drive stays) with no REPO_URL at all: "Ejecutar todo" skips 02, trains,
   exports, shows the results and tries the model (one streamed question, then a chat ended with "salir");
3. a disconnect (the local copy stays): the project is reused and every stage is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, kernel_zygote, small_inputs, small_probe

NOTEBOOK = ROOT / "colab.ipynb"
TRY_QUESTION = "¿Qué es la fotosíntesis?"
CHAT_LINES = ["¿Y la respiración celular?", "salir"]

FAKE_COLAB = {
    "__init__.py": "",
    "drive.py": '''
import os
from pathlib import Path


def mount(mountpoint, force_remount=False, **kwargs):
    with open(os.environ["FAKE_COLAB_LOG"], "a", encoding="utf-8") as log:
        log.write(f"mount {mountpoint}\\n")
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    (Path(mountpoint) / "MyDrive").symlink_to(os.environ["FAKE_COLAB_DRIVE"], target_is_directory=True)
''',
    "files.py": '''
import os
from pathlib import Path


def upload():
    with open(os.environ["FAKE_COLAB_LOG"], "a", encoding="utf-8") as log:
        log.write("upload\\n")
    source = Path(os.environ["FAKE_COLAB_UPLOAD"])
    data = source.read_bytes()
    Path(source.name).write_bytes(data)  # Colab also leaves the uploaded file in the working folder
    return {source.name: data}
''',
    "userdata.py": '''
import json
import os


class SecretNotFoundError(Exception):
    pass


def get(name):
    secrets = json.loads(os.environ.get("FAKE_COLAB_SECRETS", "{}"))
    if name not in secrets:
        raise SecretNotFoundError(name)
    return secrets[name]
''',
}

# What Colab's runtime does before the first cell: google.colab is imported; and the user who types answers.
RUNTIME_CELL = '''\
import os

import google.colab  # noqa: F401

_lines = iter(os.environ["FAKE_COLAB_INPUT"].split("|"))


def _typed(prompt=""):
    line = next(_lines)
    print(prompt + line)
    return line


# ipykernel points builtins.input at its own raw_input before every cell (as Colab's kernel does, to ask the
# browser); answering there is answering as the user would.
get_ipython().kernel.raw_input = _typed  # noqa: F821
'''


def _project_zip(target: Path) -> Path:
    """This working tree as GitHub's "Download ZIP" packs it: every file under afinar-main/."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split("\n")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            if name and (ROOT / name).is_file():
                archive.write(ROOT / name, f"afinar-main/{name}")
    return target


def _execute(work: Path, env: dict, cell_ids: list[str] | None, name: str):
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if cell_ids is not None:
        notebook.cells = [c for c in notebook.cells if c.get("id") in cell_ids]
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RUNTIME_CELL, id="runtime-colab"))
    session = work / name
    session.mkdir()
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", allow_errors=True)
    try:
        client.execute(cwd=str(session), env=env)
    finally:
        nbformat.write(notebook, work / f"{name}.ipynb")  # to read when something fails
    return notebook


def _text(notebook, cell_id: str) -> str:
    cell = next(c for c in notebook.cells if c.get("id") == cell_id)
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


def _errors(notebook) -> list:
    return [(c.get("id"), o.get("ename"), o.get("evalue")) for c in notebook.cells if c.cell_type == "code"
            for o in c.outputs if o["output_type"] == "error"]


def _log(work: Path) -> list[str]:
    path = work / "colab.log"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    work = tmp_path_factory.mktemp("colab_runtime")
    fake = work / "fake_modules"
    for name, text in FAKE_COLAB.items():
        (fake / "google" / "colab").mkdir(parents=True, exist_ok=True)
        (fake / "google" / "colab" / name).write_text(text, encoding="utf-8")
    drive = work / "drive_storage"
    drive.mkdir()
    content = work / "content"
    questions, dataset = small_inputs(work)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "COLAB_", "AFINAR_")) or k == "AFINAR_CACHE"}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
        "FAKE_COLAB_LOG": str(work / "colab.log"), "FAKE_COLAB_DRIVE": str(drive),
        "FAKE_COLAB_UPLOAD": str(_project_zip(work / "afinar-main.zip")),
        "FAKE_COLAB_INPUT": "|".join(CHAT_LINES),
        "AFINAR_WORK_DIR": str(content), "AFINAR_DRIVE_OUTPUT": "1",
        "AFINAR_QUESTIONS": str(questions), "AFINAR_DATASET": str(dataset),
        "AFINAR_MAX_STEPS": "2", "AFINAR_BATCH_SIZE": "2", "AFINAR_LOGGING_STEPS": "1",
        # Rows of 128 tokens: what these sessions test is which stages run, skip or resume, not the row length.
        "AFINAR_MAX_SEQ_LENGTH": "128", "AFINAR_MAX_NEW_TOKENS": "8", "AFINAR_GGUF": "none",
        "AFINAR_PROBE_FILE": str(small_probe(work / "sonda.json")),
        "AFINAR_TRY_MAX_NEW_TOKENS": "12",
        "AFINAR_TRY_QUESTION": TRY_QUESTION,
        "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    # The stages the cells start reach a zygote with this environment (tests/conftest.py: kernel_zygote).
    with kernel_zygote(env, work) as env:
        # 1. A clone that cannot work, then the zip; only up to stage 02.
        first = _execute(work, {**env, "AFINAR_REPO_URL": f"file://{work}/no-existe/afinar.git"},
                         ["parametros", "auxiliares", "proyecto", "entorno", "etapa-02"], "sesion1")
        log_first = _log(work)
        local_copy_first = (content / "afinar" / "02_load_model.py").is_file()
        # 2. A runtime reset: /content is wiped (the mount and the project copy with it), Drive keeps the output.
        shutil.rmtree(content)
        second = _execute(work, {**env, "AFINAR_REPO_URL": ""}, None, "sesion2")
        log_second = _log(work)[len(log_first):]
        # 3. A disconnect: the kernel restarts, /content stays.
        third = _execute(work, {**env, "AFINAR_REPO_URL": ""},
                         ["parametros", "auxiliares", "proyecto", "etapa-02", "etapa-03", "etapa-04"], "sesion3")
        log_third = _log(work)[len(log_first) + len(log_second):]
    return {"work": work, "out": drive / "afinar" / "salida", "first": first, "second": second, "third": third,
            "logs": (log_first, log_second, log_third), "local_copy_first": local_copy_first}


@pytest.mark.slow
def test_failed_clone_explains_and_falls_back_to_the_uploaded_zip(sessions):
    first = sessions["first"]
    assert _errors(first) == []
    text = _text(first, "proyecto")
    assert "No se pudo clonar" in text and "privado" in text and "sube un zip" in text
    assert sessions["local_copy_first"]
    assert "upload" in sessions["logs"][0]


@pytest.mark.slow
def test_output_goes_to_drive_which_is_mounted_once(sessions):
    out = sessions["out"]
    first_log, second_log, third_log = sessions["logs"]
    mounts = [line for line in first_log if line.startswith("mount")]
    assert mounts == [f"mount {sessions['work'] / 'content' / 'drive'}"]
    assert len([line for line in second_log if line.startswith("mount")]) == 1  # a reset unmounts Drive
    assert not any(line.startswith("mount") for line in third_log)  # a disconnect keeps it mounted
    assert str(sessions["work"] / "content" / "drive" / "MyDrive" / "afinar" / "salida") in _text(
        sessions["first"], "proyecto")
    assert "Listo. Manifiesto" in _text(sessions["first"], "etapa-02")
    # Nothing of the run is left in the project copy: it all went to Drive.
    assert not (sessions["work"] / "content" / "afinar" / "salida").exists()


@pytest.mark.slow
def test_after_a_reset_run_all_continues_from_what_run_json_says(sessions):
    second, out = sessions["second"], sessions["out"]
    assert _errors(second) == []
    assert "No hay REPO_URL" in _text(second, "proyecto") and "upload" in sessions["logs"][1]
    skipped = _text(second, "etapa-02")
    assert "La etapa 02 ya terminó" in skipped and "$ python 02_load_model.py" not in skipped
    assert "$ python 03_train_model.py" in _text(second, "etapa-03")
    assert "$ python 04_inference_and_export.py" in _text(second, "etapa-04")
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert {name: rec["status"] for name, rec in manifest["stages"].items()} == {
        "load": "done", "train": "done", "export": "done"}
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged_16bit" / "model.safetensors").exists()


@pytest.mark.slow
def test_after_a_disconnect_the_copy_is_reused_and_finished_stages_are_skipped(sessions):
    third = sessions["third"]
    assert _errors(third) == []
    assert "ya está en" in _text(third, "proyecto") and "upload" not in sessions["logs"][2]
    for key in ("02", "03", "04"):
        text = _text(third, f"etapa-{key}")
        assert f"La etapa {key} ya terminó" in text and "$ python" not in text


@pytest.mark.slow
def test_try_the_model_streams_one_answer_then_chats_until_salir(sessions):
    text = _text(sessions["second"], "prueba")
    assert f"Tú: {TRY_QUESTION}" in text
    assert f"Tú: {CHAT_LINES[0]}" in text and "Tú: salir" in text and "Fin del chat." in text
    # Two answers, each after its "Modelo:" label, with some text streamed in.
    replies = text.split("Modelo: ")[1:]
    assert len(replies) == 2
    assert all(reply.split("\nTú:")[0].strip() for reply in replies)


# ------------------------------------------------------------------ fast checks of the pieces the cells use


def _run_json(folder: Path, stages: dict) -> Path:
    from afinar.core import settings

    recorded = {key: settings.default(key, "cpu") for key in settings.TRAIN_KEYS}
    recorded.update({"model": "m", "base_path": str(folder), "backend": "hf", "load_in_4bit": False, "lora_r": 16,
                     "lora_alpha": 32, "lora_dropout": 0.0, "lora_layers": None})
    data = {"schema": 1, "model": {"base_model": "m", "base_path": str(folder), "backend": "hf",
                                   "load_in_4bit": False},
            "settings": recorded, "stages": {name: {"status": "done", "finished_at": "2026-01-01T00:00:00+00:00"}
                                             for name in stages}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def _complete_checkpoint(folder: Path, step: int) -> None:
    from afinar.core import checkpoints

    checkpoint = folder / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in checkpoints.REQUIRED:
        (checkpoint / name).write_text("{}", encoding="utf-8")
    checkpoints.mark_complete(checkpoint)


def test_next_step_follows_run_json(tmp_path):
    from afinar.stages.colab import next_step

    fresh = tmp_path / "nueva"
    assert next_step(fresh, "load").run and next_step(fresh, "load").flags == []
    cut = _run_json(tmp_path / "cortada", [])  # stage 02 started and never finished
    assert next_step(cut, "load").flags == ["--overwrite"]
    loaded = _run_json(tmp_path / "cargada", ["load"])
    assert not next_step(loaded, "load").run and "ya terminó" in next_step(loaded, "load").reason
    assert next_step(loaded, "train").run and next_step(loaded, "train").flags == []
    _complete_checkpoint(loaded, 4)
    (loaded / "checkpoints" / "checkpoint-6").mkdir()  # a kill in the middle of a save: not trusted
    resumed = next_step(loaded, "train")
    assert resumed.flags == ["--resume"] and "checkpoint-4" in resumed.reason
    trained = _run_json(tmp_path / "entrenada", ["load", "train"])
    assert not next_step(trained, "train").run and next_step(trained, "export").run
    assert next_step(trained, "train", overwrite=True).flags == ["--overwrite"]


def _proyecto():
    import importlib.util

    spec = importlib.util.spec_from_file_location("proyecto_cell", ROOT / "tools" / "colab_cells" / "proyecto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_project_zip_is_checked_before_it_is_used(tmp_path):
    import io

    proyecto = _proyecto()

    def zipped(files: dict) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, text in files.items():
                archive.writestr(name, text)
        return buffer.getvalue()

    target = proyecto.extract_zip(zipped({"afinar-main/02_load_model.py": "", "afinar-main/afinar/x.py": ""}),
                                  tmp_path / "a")
    assert (target / "02_load_model.py").is_file() and (target / "afinar" / "x.py").is_file()
    with pytest.raises(proyecto.ProjectMissing, match="ruta no permitida"):
        proyecto.extract_zip(zipped({"../fuera.py": "", "02_load_model.py": ""}), tmp_path / "b")
    with pytest.raises(proyecto.ProjectMissing, match="no contiene el proyecto"):
        proyecto.extract_zip(zipped({"fotos/gato.jpg": ""}), tmp_path / "c")
    with pytest.raises(proyecto.ProjectMissing, match="no es un archivo zip"):
        proyecto.extract_zip(b"no soy un zip", tmp_path / "d")
    assert not (tmp_path / "fuera.py").exists() and not (tmp_path / "b").exists()


def test_a_base_model_wiped_by_a_reset_is_fetched_again(tmp_path, embedded_path, capsys):
    """run.json on Drive outlives the caches a reset wipes: the embedded base comes back from its package."""
    from afinar.core import embedded
    from afinar.train import modeling

    gone = tmp_path / "cache_borrada" / embedded.checkpoint_dir().name
    run = {"model": {"base_model": embedded.ORIGINAL_HUB_ID, "base_path": str(gone)},
           "settings": {"base_path": str(gone)}}
    assert modeling.ensure_base_path(run) == str(embedded_path)
    assert run["settings"]["base_path"] == run["model"]["base_path"] == str(embedded_path)
    assert "ya no está" in capsys.readouterr().out
    assert modeling.ensure_base_path(run) == str(embedded_path)  # present: nothing to do
