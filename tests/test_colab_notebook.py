"""colab.ipynb: generated from the scripts, and executed end to end in a real kernel (CPU, embedded model).

The slow test runs every cell of the committed notebook with nbclient from the repository root, as a user
outside Colab would: the real 01_setup.sh, the three stages with tiny settings given through the
AFINAR_* variables the parameters cell reads, and the push cell with PUSH on, against the loopback
stand-in for the Hub (tests/fake_hub.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, kernel_zygote, small_inputs, small_probe

NOTEBOOK = ROOT / "colab.ipynb"
TOKEN = "hf_COLABplantedTOKEN0123456789abcdefXYZ"
REPO_ID = "ana/asistente-bio-colab"


def _make_colab():
    spec = importlib.util.spec_from_file_location("make_colab", ROOT / "tools" / "make_colab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cell(notebook: dict, cell_id: str) -> dict:
    return next(c for c in notebook["cells"] if c["id"] == cell_id)


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_committed_notebook_is_generated_from_the_scripts():
    make_colab = _make_colab()
    committed = NOTEBOOK.read_text(encoding="utf-8")
    # The URL is whatever the clone that generated it had as origin (or none); the rest comes from the scripts.
    url = make_colab.committed_repo_url(committed)
    assert url is not None and "USUARIO" not in url
    assert committed == make_colab.render(url), (
        "colab.ipynb no coincide con los scripts: ejecuta python tools/make_colab.py")


def test_repo_url_comes_from_the_git_remote_without_credentials(tmp_path):
    make_colab = _make_colab()
    repo = tmp_path / "clon"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert make_colab.detect_repo_url(repo) == ""  # no remote: the notebook asks for a zip instead
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", "git@github.com:ana/afinar.git"], check=True)
    assert make_colab.detect_repo_url(repo) == "https://github.com/ana/afinar.git"  # Colab has no ssh keys
    subprocess.run(["git", "-C", str(repo), "remote", "set-url", "origin",
                    "https://ana:ghp_SECRETO123@github.com/ana/afinar.git"], check=True)
    assert make_colab.detect_repo_url(repo) == "https://github.com/ana/afinar.git"  # never a token in the notebook
    text = make_colab.render("https://github.com/ana/afinar.git")
    assert make_colab.committed_repo_url(text) == "https://github.com/ana/afinar.git"


def test_parameters_default_to_the_scripts_defaults_and_read_the_environment(monkeypatch):
    make_colab = _make_colab()
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    source = _source(_cell(notebook, "parametros"))
    for param in make_colab.PARAMS:
        monkeypatch.delenv(f"AFINAR_{param.name}", raising=False)
    defaults: dict = {}
    exec(compile(source, "<parametros>", "exec"), defaults)

    parsed = {key: make_colab.load_script(key).parse_args([]) for key in make_colab.SCRIPTS}
    assert defaults["OUTPUT_DIR"] == parsed["02"].output_dir == parsed["04"].output_dir == "salida"
    assert defaults["LORA_R"] == parsed["02"].lora_r == 16
    assert defaults["MAX_NEW_TOKENS"] == parsed["02"].max_new_tokens
    assert defaults["QUESTIONS"] == parsed["02"].questions
    assert defaults["PROBE_FILE"] is None and parsed["02"].probe_file is None  # 02 picks the project's own pairs
    assert defaults["DATASET"] == parsed["03"].dataset
    assert defaults["GGUF"] == parsed["04"].gguf == "q8_0"
    assert defaults["MODEL"] is None and defaults["MAX_STEPS"] is None and defaults["LEARNING_RATE"] is None
    assert defaults["PUSH"] is False and defaults["OVERWRITE"] is False and defaults["REPO_ID"] is None
    assert defaults["DRIVE_OUTPUT"] is False and defaults["WORK_DIR"] == "/content"
    # Every default is explained next to its variable, with the script's own help text.
    assert "# --lora-r (02): rango de LoRA (por defecto: 16;" in source

    monkeypatch.setenv("AFINAR_MAX_STEPS", "7")
    monkeypatch.setenv("AFINAR_LEARNING_RATE", "5e-4")
    monkeypatch.setenv("AFINAR_PUSH", "1")
    monkeypatch.setenv("AFINAR_MODEL", "smollm2-135m")
    overridden: dict = {}
    exec(compile(source, "<parametros>", "exec"), overridden)
    assert overridden["MAX_STEPS"] == 7 and overridden["LEARNING_RATE"] == 5e-4
    assert overridden["PUSH"] is True and overridden["MODEL"] == "smollm2-135m"


def test_stage_cells_pass_the_parameters_as_flags():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    namespace: dict = {}
    exec(compile(_source(_cell(notebook, "auxiliares")), "<auxiliares>", "exec"), namespace)
    flags = namespace["flags"]
    assert flags(("--output-dir", "salida"), ("--model", None), ("--resume", False), ("--overwrite", True),
                 ("--max-steps", 2)) == ["--output-dir", "salida", "--overwrite", "--max-steps", "2"]
    stage03 = _source(_cell(notebook, "etapa-03"))
    assert '("--max-steps", MAX_STEPS)' in stage03 and '("--learning-rate", LEARNING_RATE)' in stage03


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run the whole committed notebook once; return (executed notebook, output dir, fake hub)."""
    import nbclient
    import nbformat
    from fake_hub import FakeHub

    work = tmp_path_factory.mktemp("colab")
    out = work / "salida"
    questions, dataset = small_inputs(work)
    probe = small_probe(work / "sonda.json")

    # Only the notebook's own parameters are cleared: AFINAR_CACHE (where the embedded model lives) stays.
    parameters = {f"AFINAR_{p.name}" for p in _make_colab().PARAMS} | {
        "AFINAR_REPO_URL", "AFINAR_DRIVE_OUTPUT", "AFINAR_PROJECT_DRIVE_DIR", "AFINAR_WORK_DIR", "AFINAR_TRY_QUESTION",
        "AFINAR_TRY_CHAT"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "COLAB_")) and k not in parameters and k != "TRANSFORMERS_OFFLINE"}
    salida_before = (ROOT / "salida").exists()
    with FakeHub({TOKEN: {"name": "ana", "role": "write", "orgs": []}}) as hub:
        env.update({
            "AFINAR_OUTPUT_DIR": str(out), "AFINAR_QUESTIONS": str(questions), "AFINAR_DATASET": str(dataset),
            "AFINAR_MAX_STEPS": "2", "AFINAR_BATCH_SIZE": "2", "AFINAR_LOGGING_STEPS": "1",
            # Rows of 128 tokens: MAX_SEQ_LENGTH still reaches 02 (and 03 through run.json), at half the cost of
            # every training step and perplexity pass of 256 (the end-to-end test trains at 256).
            "AFINAR_MAX_SEQ_LENGTH": "128", "AFINAR_MAX_NEW_TOKENS": "8", "AFINAR_PROBE_FILE": str(probe),
            "AFINAR_PUSH": "1", "AFINAR_REPO_ID": REPO_ID, "AFINAR_TRY_CHAT": "0",
            # The try-out cell must run without an error; what it answers is test_colab_runtime's business, and
            # its default of 300 streamed tokens was the slowest cell of this run.
            "AFINAR_TRY_MAX_NEW_TOKENS": "8",
            "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(work / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
        })
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3")
        # The stages the cells start reach a zygote with this environment (tests/conftest.py: kernel_zygote).
        with kernel_zygote(env, work) as kernel_env:
            try:
                client.execute(cwd=str(ROOT), env=kernel_env)
            finally:
                nbformat.write(notebook, work / "colab_ejecutado.ipynb")  # to read when something fails
        files = hub.repo_files(REPO_ID)
    assert (ROOT / "salida").exists() == salida_before, "el cuaderno escribió en la salida/ del repositorio"
    return notebook, out, files


def _outputs(notebook, cell_id: str) -> list[dict]:
    return next(c for c in notebook.cells if c.get("id") == cell_id).outputs


def _text(notebook, cell_id: str) -> str:
    return "".join(o.get("text", "") for o in _outputs(notebook, cell_id) if o["output_type"] == "stream")


@pytest.mark.slow
def test_every_cell_runs_and_the_pipeline_completes(executed):
    notebook, out, _ = executed
    errors = [(c.get("id"), o) for c in notebook.cells if c.cell_type == "code"
              for o in c.outputs if o["output_type"] == "error"]
    assert errors == []
    assert all(c.execution_count for c in notebook.cells if c.cell_type == "code")

    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert set(manifest["stages"]) == {"load", "train", "export"}
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    assert manifest["settings"]["max_steps"] == 2 and manifest["settings"]["max_seq_length"] == 128
    assert Path(manifest["probe_file"]).name == "sonda.json"  # PROBE_FILE reached 02 as --probe-file
    assert json.loads((out / "contraste" / "contraste.json").read_text(encoding="utf-8"))["probe"]["pairs"] == 2
    assert manifest["stages"]["train"]["metrics"]["global_step"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "<table" in (out / "contraste" / "informe.html").read_text(encoding="utf-8")
    assert (out / "merged_16bit" / "model.safetensors").exists()
    # The user's default export, not a shortcut for the test.
    assert (out / "gguf" / "model-q8_0.gguf").stat().st_size > 10_000_000


@pytest.mark.slow
def test_stage_cells_stream_the_scripts_output_and_progress(executed):
    notebook, out, _ = executed
    assert "Todo listo" in _text(notebook, "entorno")
    stage02 = _text(notebook, "etapa-02")
    assert f"$ python 02_load_model.py --output-dir {out}" in stage02 and "Listo. Manifiesto" in stage02
    stage03 = _text(notebook, "etapa-03")
    assert "--max-steps 2" in stage03 and "--batch-size 2" in stage03
    assert "2/2 [" in stage03  # the Trainer's progress bar, with its elapsed<remaining times
    assert "Veredicto:" in _text(notebook, "etapa-04")


@pytest.mark.slow
def test_push_cell_uploads_with_the_token_from_the_environment(executed):
    notebook, out, files = executed
    assert "--push-only" in _text(notebook, "subida") and f"--repo-id {REPO_ID}" in _text(notebook, "subida")
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "gguf/model-q8_0.gguf"} <= set(files)
    assert files["model.safetensors"] == (out / "merged_16bit" / "model.safetensors").read_bytes()
    shown = json.dumps(notebook, ensure_ascii=False)
    assert TOKEN not in shown
    leaks = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_results_cell_shows_the_report_and_the_loss_curve(executed):
    notebook, _, _ = executed
    outputs = _outputs(notebook, "resultados")
    html = [o["data"]["text/html"] for o in outputs if o["output_type"] == "display_data" and "text/html" in o["data"]]
    assert html and "<iframe srcdoc=" in html[0] and "Veredicto" in html[0]
    assert any("image/png" in o.get("data", {}) for o in outputs)
