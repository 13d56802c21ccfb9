"""Each numbered script, pasted whole into a notebook cell, runs in a real Jupyter kernel.

The kernel's sys.argv holds its own flags (`-f kernel-….json`), which the scripts must ignore. The cells run
in a temporary "repository root" (the scripts linked, afinar/ and smaller data files copied under the default
names) so that the defaults (`salida/`, `tu_dataset.json`, `preguntas_contraste.json`, `sondas_errores.json`)
resolve as they would in the real one, without touching it. Stage 02 really runs pasted with its defaults; 03
and 04 are pasted before their turn (their Spanish "missing stage" error shows the kernel flags were ignored)
and then pasted with the last line changed to `main([...])`, as a user does to pass options from a notebook.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPTS = ("02_load_model.py", "03_train_model.py", "04_inference_and_export.py")
MAIN_CALL = "\n    main()\n"


def pasted(script: str, main_args: list[str] | None = None) -> str:
    """The script's whole text, as pasted; with main_args, its final `main()` edited to `main(main_args)`."""
    text = (ROOT / script).read_text(encoding="utf-8")
    if main_args is None:
        return text
    assert text.count(MAIN_CALL) == 1, f"{script} debe terminar con una sola llamada main()"
    return text.replace(MAIN_CALL, f"\n    main({main_args!r})\n")


def make_repo_root(root) -> None:
    for name in SCRIPTS:
        (root / name).symlink_to(ROOT / name)
    # A copy, not a link: 02 looks for the default probe file next to the package (resolving links), so the
    # smaller probe below is found as the project's own, as the other data files are under their default names.
    shutil.copytree(ROOT / "afinar", root / "afinar", ignore=shutil.ignore_patterns("__pycache__"))
    # One of the project's questions (its keywords and fact), asked so that the model can answer in a word: 02
    # and 04 still generate with the default limit of 200 new tokens, which the base model used up on the first
    # question (~40 s per stage on the CI machine); here it stops with EOS after a few tokens.
    question = json.loads((ROOT / "preguntas_contraste.json").read_text(encoding="utf-8"))[1]
    questions = [{**question, "pregunta": "¿Respiran las plantas? Responde solo sí o no."}]
    (root / "preguntas_contraste.json").write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    probe = json.loads((ROOT / "sondas_errores.json").read_text(encoding="utf-8"))[:2]
    (root / "sondas_errores.json").write_text(json.dumps(probe, ensure_ascii=False), encoding="utf-8")
    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))[:24]
    (root / "tu_dataset.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")


CELLS = {
    "argv": 'import sys\nprint("ARGV", sys.argv)\nprint("IPYKERNEL", "ipykernel" in sys.modules)',
    "03_first": pasted("03_train_model.py"),
    "04_first": pasted("04_inference_and_export.py"),
    "02": pasted("02_load_model.py"),
    "04_before_03": pasted("04_inference_and_export.py"),
    "03": pasted("03_train_model.py", ["--max-steps", "1", "--batch-size", "2", "--logging-steps", "1",
                                       "--max-seq-length", "128"]),
    "04": pasted("04_inference_and_export.py", ["--no-merge"]),
}
EXPECTED_TO_FAIL = {"03_first", "04_first", "04_before_03"}


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    import nbclient
    import nbformat

    root = tmp_path_factory.mktemp("raiz_del_repo")
    make_repo_root(root)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(source, id=name.replace("_", "-"),
                                  metadata={"tags": ["raises-exception"]} if name in EXPECTED_TO_FAIL else {})
        for name, source in CELLS.items()
    ])
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3")
    salida_before = (ROOT / "salida").exists()
    try:
        client.execute(cwd=str(root), env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    finally:
        nbformat.write(notebook, root / "pegado_ejecutado.ipynb")  # to read when something fails
    assert (ROOT / "salida").exists() == salida_before, "las celdas escribieron en la salida/ del repositorio"
    outputs = {name: cell.outputs for name, cell in zip(CELLS, notebook.cells)}
    return root, outputs


def stream(outputs, name: str, which: str | None = None) -> str:
    return "".join(o.get("text", "") for o in outputs[name]
                   if o["output_type"] == "stream" and (which is None or o["name"] == which))


def errors(outputs, name: str) -> list[dict]:
    return [o for o in outputs[name] if o["output_type"] == "error"]


def test_cells_run_in_a_kernel_whose_argv_holds_its_own_flags(kernel_run):
    _, outputs = kernel_run
    text = stream(outputs, "argv")
    argv = text.split("ARGV ", 1)[1].splitlines()[0]
    assert "'-f'" in argv and ".json'" in argv
    assert "IPYKERNEL True" in text


@pytest.mark.parametrize("cell, missing", [("03_first", "02_load_model.py"), ("04_first", "02_load_model.py"),
                                           ("04_before_03", "03_train_model.py")])
def test_pasted_before_its_turn_names_the_missing_stage(kernel_run, cell, missing):
    _, outputs = kernel_run
    [error] = errors(outputs, cell)
    # main_guard's exit 2: the Spanish message on stderr and no Python traceback.
    assert (error["ename"], error["evalue"]) == ("SystemExit", "2")
    message = stream(outputs, cell, "stderr")
    assert message.startswith("ERROR: ") and missing in message and "--output-dir salida" in message
    everything = message + stream(outputs, cell, "stdout") + "".join(error["traceback"])
    assert "Traceback" not in everything
    assert "unrecognized arguments" not in everything and "usage:" not in everything


def test_pasted_02_runs_with_its_defaults_in_the_repo_root(kernel_run):
    root, outputs = kernel_run
    assert errors(outputs, "02") == []
    manifest = json.loads((root / "salida" / "run.json").read_text(encoding="utf-8"))
    assert manifest["stages"]["load"]["status"] == "done"
    assert manifest["generation"]["max_new_tokens"] == 200  # the default, not a test setting
    from afinar.evaluate.generation import DEFAULT_REPETITION_PENALTY
    from afinar.core.settings import lora_alpha_for

    # 04 reads the penalty back from run.json, so "antes" and "después" are generated alike.
    assert manifest["generation"]["repetition_penalty"] == DEFAULT_REPETITION_PENALTY
    assert manifest["settings"]["lora_alpha"] == lora_alpha_for(16, manifest["device"]["kind"])
    assert manifest["questions_file"] == str((root / "preguntas_contraste.json").resolve())
    assert manifest["probe_file"] == str((root / "sondas_errores.json").resolve())  # next to the scripts
    assert manifest["settings"]["lora_r"] == 16
    answers = (root / "salida" / "contraste" / "antes.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(answers) == 1
    assert "Listo. Manifiesto: salida/run.json" in stream(outputs, "02", "stdout")


def test_pasted_03_and_04_with_options_in_main_train_and_report(kernel_run):
    root, outputs = kernel_run
    assert errors(outputs, "03") == [] and errors(outputs, "04") == []
    manifest = json.loads((root / "salida" / "run.json").read_text(encoding="utf-8"))
    assert manifest["stages"]["train"]["metrics"]["global_step"] == 1
    assert manifest["stages"]["train"]["dataset"] == "tu_dataset.json"
    assert (root / "salida" / "adapter" / "adapter_model.safetensors").exists()
    assert (root / "salida" / "loss.png").exists()
    assert manifest["stages"]["export"]["status"] == "done"
    assert (root / "salida" / "contraste" / "informe.html").exists()
    assert not (root / "salida" / "merged_16bit").exists()
    assert "Veredicto:" in stream(outputs, "04", "stdout")
