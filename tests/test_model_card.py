"""The Spanish model card: valid Hub metadata, the run's settings and contrast table, no token, and a
usage snippet that really runs."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from afinar.core.embedded import ensure_checkpoint
from afinar.export.model_card import render_model_card, write_model_card
from afinar.core.prompts import SYSTEM_PROMPT

TOKEN = "hf_FAKEtoken1234567890abcdef"
CONTRAST_MD = (
    "| Pregunta | Antes | Después | Perplejidad |\n"
    "| --- | --- | --- | --- |\n"
    "| ¿Qué es el cloroplasto? | Un orgánulo... | El orgánulo donde ocurre la fotosíntesis. | 12.3 → 8.1 |"
)


def _manifest(**model) -> dict:
    return {
        "model": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_path": "/cache/smollm2",
                  "backend": "hf", "load_in_4bit": False, **model},
        "settings": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "max_seq_length": 512,
                     "learning_rate": 0.0002, "epochs": 3, "max_steps": -1, "batch_size": 4, "grad_accum": 2,
                     "seed": 42, "precision": "fp32"},
        "stages": {"train": {"status": "done",
                             "data": {"train_entries": 118, "eval_entries": 13, "long": 41, "short": 77,
                                      "duplicates_dropped": 5, "hub": {"dataset": "somosnlp/biologia-es"}},
                             "metrics": {"final_loss": 1.0421, "tokens_per_second": 812.5}}},
    }


@pytest.mark.parametrize("kind, library", [("merged", "transformers"), ("adapter", "peft"), ("gguf", "gguf")])
def test_front_matter_is_valid_hub_metadata(tmp_path, kind, library):
    path = write_model_card(tmp_path, kind=kind, manifest=_manifest(), contrast_md=CONTRAST_MD, repo_id="ana/bio")

    card = ModelCard.load(path)
    meta = metadata_load(path)
    assert card.data.to_dict() == meta
    assert meta["language"] == ["es"]
    assert meta["library_name"] == library
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["somosnlp/biologia-es"]
    assert {"lora", "peft", "sft", "español", "biología", "fotosíntesis"} <= set(meta["tags"])
    assert card.text.lstrip().startswith("# bio")


def test_card_lists_settings_data_and_contrast_table(tmp_path):
    path = write_model_card(tmp_path, kind="merged", manifest=_manifest(), contrast_md=CONTRAST_MD,
                            repo_id="ana/bio")
    text = path.read_text(encoding="utf-8")

    for row in ("| Rango LoRA (r) | 16 |", "| lora_alpha | 32 |", "| lora_dropout | 0.05 |",
                "| Tasa de aprendizaje | 0.0002 |", "| Épocas | 3 |", "| Longitud máxima de secuencia | 512 |",
                "| Tamaño de lote por dispositivo | 4 |", "| Acumulación de gradiente | 2 |",
                "| Lote efectivo | 8 |", "| Semilla | 42 |", "| Precisión | fp32 |",
                "| Motor de entrenamiento | Transformers + PEFT + TRL |",
                "| Ejemplos de entrenamiento | 118 |", "| Ejemplos de evaluación (no vistos al entrenar) | 13 |",
                "| Respuestas largas | 41 |", "| Respuestas cortas | 77 |", "| Duplicados descartados | 5 |",
                "| Pérdida final de entrenamiento | 1.042 |"):
        assert row in text, row
    assert CONTRAST_MD in text
    assert SYSTEM_PROMPT in text
    assert 'AutoModelForCausalLM.from_pretrained("ana/bio")' in text
    assert "`adapter/`" in text and "`gguf/`" in text
    assert "consejo médico" in text


def test_adapter_card_loads_from_the_adapter_subfolder(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    text = render_model_card(tmp_path, kind="adapter", manifest=_manifest(), repo_id="ana/bio")

    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    assert 'PeftModel.from_pretrained(base, "ana/bio", subfolder="adapter")' in text
    assert 'AutoTokenizer.from_pretrained("ana/bio", subfolder="adapter")' in text


def test_gguf_card_shows_its_files_and_modelfile(tmp_path):
    (tmp_path / "bio-q8_0.gguf").write_bytes(b"GGUF" + bytes(2_000_000))
    (tmp_path / "Modelfile").write_text('FROM ./bio-q8_0.gguf\nPARAMETER stop "<|im_end|>"\n')

    text = render_model_card(tmp_path, kind="gguf", manifest=_manifest(), repo_id="ana/bio")

    assert "hf download ana/bio gguf/bio-q8_0.gguf gguf/Modelfile --local-dir ." in text
    assert 'FROM ./bio-q8_0.gguf\nPARAMETER stop "<|im_end|>"' in text
    assert "- `bio-q8_0.gguf` (2.0 MB)" in text
    assert "ollama create asistente-bio -f Modelfile" in text


def test_llama_base_gets_its_license_and_attribution(tmp_path):
    manifest = _manifest(base_model="unsloth/Llama-3.2-1B-Instruct", backend="unsloth", load_in_4bit=True)

    path = write_model_card(tmp_path, kind="adapter", manifest=manifest, contrast_md=None, repo_id=None)

    meta = metadata_load(path)
    text = path.read_text(encoding="utf-8")
    assert meta["license"] == "llama3.2"
    assert meta["base_model"] == "unsloth/Llama-3.2-1B-Instruct"
    assert "unsloth" in meta["tags"]
    assert "Built with Llama" in text
    assert "QLoRA" in text
    assert "Estructura del repositorio" not in text
    assert f'PeftModel.from_pretrained(base, "{tmp_path}")' in text


def test_sparse_manifest_still_gives_a_valid_card(tmp_path):
    path = write_model_card(tmp_path, kind="merged", manifest={"model": {"base_model": "/home/ana/modelo"}},
                            contrast_md=None, repo_id=None)

    meta = metadata_load(path)
    text = path.read_text(encoding="utf-8")
    assert "base_model" not in meta  # a local path is not a Hub id
    assert meta["license"] == "other"
    assert meta["language"] == ["es"]
    assert "| Rango LoRA (r) | no disponible |" in text
    assert "| Ejemplos de entrenamiento | no disponible |" in text
    assert "El informe de contraste no está disponible" in text


def test_embedded_alias_maps_to_its_hub_id(tmp_path):
    path = write_model_card(tmp_path, kind="gguf", manifest={"model": {"base_model": "smollm2-135m"}},
                            contrast_md=None, repo_id=None)
    assert metadata_load(path)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_card_never_contains_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manifest = _manifest()
    manifest["stages"]["train"]["data"]["hub"] = {"dataset": "somosnlp/biologia-es", "token": TOKEN,
                                                  "name": TOKEN}
    leaked_contrast = CONTRAST_MD + f"\n| eco | {TOKEN} | - | - |"

    for kind in ("merged", "adapter", "gguf"):
        folder = tmp_path / kind
        write_model_card(folder, kind=kind, manifest=manifest, contrast_md=leaked_contrast, repo_id="ana/bio")
        data = (folder / "README.md").read_bytes()
        assert TOKEN.encode() not in data
        assert b"hf_FAKE" not in data
        assert metadata_load(folder / "README.md")["datasets"] == ["somosnlp/biologia-es"]


@pytest.mark.slow
def test_merged_card_snippet_runs_on_the_real_model():
    checkpoint = ensure_checkpoint()
    text = render_model_card(checkpoint, kind="merged", manifest=_manifest(), contrast_md=None, repo_id=None)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "max_new_tokens=256" in code
    code = code.replace("max_new_tokens=256", "max_new_tokens=6")  # only shortened to keep the test fast

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "ficha_modelo", "exec"), {})

    assert printed.getvalue().strip()


def test_the_card_says_how_stage_03_trained_when_it_changed_engine(tmp_path):
    # Stage 02 chose Unsloth; on an H200 stage 03 trained with the compiled engine and an FP8 base.
    manifest = _manifest(base_model="unsloth/Llama-3.2-1B-Instruct", backend="unsloth", load_in_4bit=True)
    manifest["stages"]["train"]["metrics"]["engine"] = {
        "engine": "compiled", "backend": "hf", "compile_layers": True, "dequantize_4bit": True,
        "fp8_base": True, "fp8_drift": 0.0014}

    text = render_model_card(tmp_path, kind="adapter", manifest=manifest, repo_id=None)

    row = next(line for line in text.splitlines() if line.startswith("| Motor de entrenamiento"))
    assert "Transformers + PEFT + TRL" in row and "Unsloth" not in row
    assert "torch.compile" in row and "descuantizada una vez a bf16" in row
    assert "FP8 (e4m3)" in row and "0,14 %" in row


def test_the_card_of_a_t4_run_says_fp16_and_the_attention_that_ran(tmp_path):
    # Issue 16: a T4 trains the compiled engine on an fp16 base; where flex could not run, SDPA took over.
    manifest = _manifest(base_model="unsloth/Llama-3.2-1B-Instruct", backend="unsloth", load_in_4bit=True)
    manifest["stages"]["train"]["metrics"]["engine"] = {
        "engine": "compiled", "backend": "hf", "compile_layers": True, "dequantize_4bit": True, "precision": "fp16",
        "attn_implementation": "sdpa", "fp8_base": False}

    text = render_model_card(tmp_path, kind="adapter", manifest=manifest, repo_id=None)

    row = next(line for line in text.splitlines() if line.startswith("| Motor de entrenamiento"))
    assert "descuantizada una vez a fp16" in row and "SDPA" in row and "flex" in row and "FP8" not in row


def test_the_card_snippet_generates_with_the_penalty_02_recorded(tmp_path):
    manifest = _manifest(base_model="unsloth/Llama-3.2-1B-Instruct", backend="unsloth", load_in_4bit=True)
    manifest["generation"] = {"max_new_tokens": 200, "batch_size": 8, "repetition_penalty": 1.3}
    text = render_model_card(tmp_path, kind="adapter", manifest=manifest, repo_id=None)
    assert "repetition_penalty=1.3)" in text
