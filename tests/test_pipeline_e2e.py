"""End to end: the four real scripts, as subprocesses, on the embedded model, a few steps, into a temp dir."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT, run_script, small_probe

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"pregunta": "¿De dónde proviene el oxígeno que liberan las plantas durante la fotosíntesis?",
     "palabras_clave": ["agua", "fotólisis"]},
    {"pregunta": "¿Respiran las plantas?", "palabras_clave": ["respir"]},
    {"pregunta": "¿Necesita oscuridad el ciclo de Calvin?"},
]
from afinar.export.merge import DEFAULT_TOLERANCE, MIN_TOP1_AGREEMENT

# merged_16bit/ is fp16 by default: the bounds are the ones afinar.export.merge states and explains.
MERGE_MAX_DIFF_OVER_STD = DEFAULT_TOLERANCE["float16"]
MERGE_TOP1_AGREEMENT = MIN_TOP1_AGREEMENT["float16"]
# Planted in every stage's environment: it must never reach a file, stdout or stderr.
FAKE_TOKEN = "hf_PLANTEDfakeTOKEN0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    out = work / "salida"
    questions = work / "preguntas.json"
    questions.write_text(json.dumps(QUESTIONS, ensure_ascii=False), encoding="utf-8")
    # The project's own entries, fewer of them: 24 plain ones and the 2 shortest that carry a misconception
    # ('rejected'), so 03 still runs its SFT and then its DPO phase, and 04 still scores held-out entries. With all
    # 301 entries the DPO phase and the held-out perplexity (30 entries, before and after) were most of this
    # module's ~400 s; the DPO phase costs its reference and training passes over every pair (the first 3 pairs:
    # 41 s of 03's 63). Two pairs, not one: the held-out share is drawn at random and must not take every pair;
    # one preference epoch of them is one DPO step.
    entries = json.loads((ROOT / "tu_dataset.json").read_text(encoding="utf-8"))
    pairs = sorted((e for e in entries if "rejected" in e),
                   key=lambda e: len(e["instruction"] + e.get("input", "") + e["output"] + e["rejected"]))[:2]
    dataset = work / "datos.json"
    dataset.write_text(json.dumps([e for e in entries if "rejected" not in e][:24] + pairs, ensure_ascii=False),
                       encoding="utf-8")
    env = {"HF_TOKEN": FAKE_TOKEN}
    logs = {}
    # Rows of 128 tokens instead of the CPU default of 640: the same stages, data (SFT and DPO) and exports, at a
    # fraction of the cost of every training step and perplexity pass. 03 and 04 inherit it from run.json.
    logs["02"] = run_script("02_load_model.py", "--output-dir", str(out), "--questions", str(questions),
                            "--max-new-tokens", "16", "--max-seq-length", "128", "--repetition-penalty", "1.2",
                            "--probe-file", str(small_probe(work / "sonda.json")), env=env)
    logs["03"] = run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(dataset),
                            "--max-steps", "3", "--batch-size", "2", "--preference", "dpo", "--preference-epochs", "1",
                            "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3", env=env)
    logs["04"] = run_script("04_inference_and_export.py", "--output-dir", str(out), env=env)
    return out, logs


def test_manifest_records_every_stage(pipeline):
    out, _ = pipeline
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert set(manifest["stages"]) == {"load", "train", "export"}
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    assert manifest["settings"]["lora_r"] == 16 and manifest["settings"]["max_steps"] == 3
    assert manifest["settings"]["max_seq_length"] == 128  # 02's flag, inherited by 03
    assert manifest["stages"]["train"]["metrics"]["global_step"] == 3
    # The CPU plan keeps the chat template's system prompt and user header once per packed row.
    assert manifest["stages"]["train"]["metrics"]["engine"]["share_prefix"] is True
    assert manifest["stages"]["train"]["metrics"]["shared_prefix_tokens"] > 20
    preference = manifest["stages"]["train"]["metrics"]["preference"]  # the DPO phase ran after the SFT
    assert preference["mode"] == "dpo" and preference["pairs"] > 0 and preference["steps"] > 0
    assert manifest["stages"]["train"]["data"]["eval"] > 0  # and 04 scored held-out entries
    assert manifest["versions"]["trl"] == "1.15.0"
    # The merged model read back from disk answers like base + adapter: within the tolerance, same top token.
    check = manifest["stages"]["export"]["merge"]["verification"]
    # Above 0: a float16 merge always rounds something; exactly 0 would mean a model compared with itself.
    assert 0 < check["relative_max_diff"] <= check["tolerance"], check
    assert check["top1_agreement"] >= check["min_top1_agreement"] > 0.5, check


def test_adapter_weights_changed(pipeline):
    from safetensors.torch import load_file

    out, _ = pipeline
    before = load_file(str(out / "adapter_inicial" / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    changed = [k for k in before if not (before[k] == after[k]).all()]
    # LoRA B starts at zero, so every B matrix must have moved for the adapter to do anything at all.
    b_keys = [k for k in before if "lora_B" in k]
    assert b_keys and all(k in changed for k in b_keys)
    assert all(float(before[k].abs().max()) == 0.0 for k in b_keys)


def test_training_artifacts(pipeline):
    out, logs = pipeline
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"step", "loss", "learning_rate", "tokens_per_second"} <= r.keys() for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert "step=3 loss=" in logs["03"].stdout
    assert "heredado de run.json: lora_r" not in logs["03"].stdout  # LoRA shape is fixed by 02, not re-inherited
    assert "NOTA: --max-steps 3 sustituye" in logs["03"].stdout


def test_contrast_outputs(pipeline):
    out, _ = pipeline
    before = (out / "contraste" / "antes.jsonl").read_text(encoding="utf-8").splitlines()
    after = (out / "contraste" / "despues.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(before) == len(after) == len(QUESTIONS)
    contrast = json.loads((out / "contraste" / "contraste.json").read_text(encoding="utf-8"))
    assert set(contrast["perplexity"]) == {"before", "after"}
    assert contrast["perplexity"]["before"] > 1 and contrast["perplexity"]["after"] > 1
    assert isinstance(contrast["verdict"]["ready"], bool) and contrast["verdict"]["reasons"]
    assert contrast["probe"]["pairs"] == 2  # the probe file 02 was given, scored by 04 before and after
    assert "<table" in (out / "contraste" / "informe.html").read_text(encoding="utf-8")
    # The report says how 03 trained the preference (here DPO after the SFT, as 03 was asked).
    assert "SFT y después DPO" in (out / "contraste" / "informe.md").read_text(encoding="utf-8")


def test_merged_model_matches_base_plus_adapter(pipeline, embedded_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = pipeline
    tokenizer = AutoTokenizer.from_pretrained(out / "merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_16bit", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, out / "adapter").eval()
    text = "La fotosíntesis transforma la energía de la luz en energía química dentro del cloroplasto."
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        got = merged(**ids).logits[0]
        want = reference(**ids).logits[0]
    diff = float((got - want).abs().max())
    assert diff <= MERGE_MAX_DIFF_OVER_STD * float(want.std()), diff
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agreement >= MERGE_TOP1_AGREEMENT
    assert (out / "merged_16bit" / "model.safetensors").exists()
    assert (out / "merged_16bit" / "chat_template.jinja").exists()
    assert (out / "gguf" / "model-q8_0.gguf").stat().st_size > 10_000_000
    assert "TEMPLATE" in (out / "gguf" / "Modelfile").read_text(encoding="utf-8")


def test_ollama_answers_with_the_repetition_penalty_the_contrast_test_used(pipeline):
    out, _ = pipeline
    recorded = json.loads((out / "run.json").read_text(encoding="utf-8"))["generation"]["repetition_penalty"]
    contrast = json.loads((out / "contraste" / "contraste.json").read_text(encoding="utf-8"))
    assert recorded == contrast["generation"]["repetition_penalty"] == 1.2  # 02's flag, not the default
    assert f"PARAMETER repeat_penalty {recorded:g}\n" in (out / "gguf" / "Modelfile").read_text(encoding="utf-8")


def test_rerun_is_refused_without_overwrite(pipeline):
    out, _ = pipeline
    proc = run_script("02_load_model.py", "--output-dir", str(out), check=False)
    assert proc.returncode == 2
    assert "no está vacío" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_script("03_train_model.py", "--output-dir", str(out), check=False)
    assert proc.returncode == 2 and "ya entrenó" in proc.stderr


def test_stage_out_of_order_names_the_missing_stage(pipeline, tmp_path):
    out, _ = pipeline
    early = tmp_path / "sin_entrenar"
    early.mkdir()
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    del manifest["stages"]["train"], manifest["stages"]["export"]
    (early / "run.json").write_text(json.dumps(manifest), encoding="utf-8")
    proc = run_script("04_inference_and_export.py", "--output-dir", str(early), check=False)
    assert proc.returncode == 2
    assert "03_train_model.py" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "vacio"
    proc = run_script("03_train_model.py", "--output-dir", str(empty), check=False)
    assert proc.returncode == 2 and "02_load_model.py" in proc.stderr


def test_planted_token_never_leaks(pipeline):
    out, logs = pipeline
    for name, proc in logs.items():
        assert FAKE_TOKEN not in proc.stdout and FAKE_TOKEN not in proc.stderr, name
    needle = FAKE_TOKEN.encode()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    assert leaks == []


def test_only_safetensors_weights(pipeline):
    out, _ = pipeline
    weight_suffixes = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
    # The Trainer's own optimizer/scheduler/rng state in checkpoints/ is pickled by transformers; model and
    # adapter weights everywhere are safetensors.
    offenders = [p for p in out.rglob("*") if p.suffix in weight_suffixes and "checkpoints" not in p.parts]
    assert offenders == []
    assert list((out / "checkpoints").rglob("adapter_model.safetensors"))
