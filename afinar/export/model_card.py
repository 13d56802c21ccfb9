"""The Spanish model card (README.md with Hub metadata) written beside each exported artifact.

Everything comes from the run.json manifest, read tolerantly: a missing value reads "no disponible"
instead of failing, because a card is documentation and must never block an export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from afinar.core import atomic
from afinar.core.embedded import EMBEDDED_ALIAS, ORIGINAL_HUB_ID
from afinar.core.prompts import DEFAULT_SYSTEM_PROMPT
from afinar.core.redaction import redact
from afinar.evaluate.generation import DEFAULT_REPETITION_PENALTY
from afinar.export.gguf_export import TYPE_DESCRIPTIONS
from afinar.train import engine

KINDS = ("merged", "adapter", "gguf")
LIBRARY_BY_KIND = {"merged": "transformers", "adapter": "peft", "gguf": "gguf"}
NOT_AVAILABLE = "no disponible"
EXAMPLE_QUESTION = "¿Qué papel tiene la clorofila en la fotosíntesis?"

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Hub license ids for the base models this project targets; anything else is declared "other".
_LICENSE_BY_NAME = (
    ("smollm", "apache-2.0"),
    ("llama-3.2", "llama3.2"),
    ("llama3.2", "llama3.2"),
    ("llama-3.1", "llama3.1"),
    ("llama3.1", "llama3.1"),
)

_SETTINGS_ROWS = (
    ("lora_r", "Rango LoRA (r)"),
    ("lora_alpha", "lora_alpha"),
    ("lora_dropout", "lora_dropout"),
    ("target_modules", "Módulos adaptados"),
    ("learning_rate", "Tasa de aprendizaje"),
    ("loraplus_lr_ratio", "LoRA+: tasa de lora_B sobre la de lora_A"),
    ("preference", "Preferencias (dpo, orpo o none)"),
    ("epochs", "Épocas"),
    ("max_steps", "Pasos máximos (max_steps)"),
    ("max_seq_length", "Longitud máxima de secuencia"),
    ("batch_size", "Tamaño de lote por dispositivo"),
    ("grad_accum", "Acumulación de gradiente"),
    ("seed", "Semilla"),
    ("precision", "Precisión"),
)

_DATA_ROWS = (
    ("train_entries", "Ejemplos de entrenamiento"),
    ("eval_entries", "Ejemplos de evaluación (no vistos al entrenar)"),
    ("long", "Respuestas largas"),
    ("short", "Respuestas cortas"),
    ("duplicates_dropped", "Duplicados descartados"),
)

_METRIC_LABELS = {
    "final_loss": "Pérdida final de entrenamiento",
    "train_loss": "Pérdida media de entrenamiento",
    "eval_loss": "Pérdida de evaluación",
    "perplexity": "Perplejidad",
    "eval_perplexity": "Perplejidad en evaluación",
    "tokens_per_second": "Tokens por segundo",
    "train_runtime": "Duración del entrenamiento (s)",
    "steps": "Pasos realizados",
}


# ------------------------------------------------------------------------------------ manifest reading


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _train_record(manifest: dict[str, Any]) -> dict[str, Any]:
    return _dict(_dict(manifest.get("stages")).get("train"))


def _settings(manifest: dict[str, Any]) -> dict[str, Any]:
    # Stage 03 may record the settings it actually used; those win over the top-level defaults.
    return {**_dict(manifest.get("settings")), **_dict(_train_record(manifest).get("settings"))}


def system_prompt_of(manifest: dict[str, Any]) -> str:
    """The run's system prompt (02's --system-prompt); the default for a run.json from before it existed."""
    recorded = manifest.get("system_prompt")
    return recorded if isinstance(recorded, str) and recorded.strip() else DEFAULT_SYSTEM_PROMPT


def _own_topic(manifest: dict[str, Any]) -> bool:
    """A user who chose another system prompt trained another topic: no biology wording on their card."""
    return system_prompt_of(manifest) != DEFAULT_SYSTEM_PROMPT


def base_model_id(manifest: dict[str, Any]) -> str | None:
    """The Hub id of the base model, or None when only a local path is known."""
    model = _dict(manifest.get("model"))
    for key in ("base_model_hub_id", "hub_id", "base_model", "name"):
        value = model.get(key) or (manifest.get(key) if key == "base_model" else None)
        if not isinstance(value, str) or not value.strip():
            continue
        value = value.strip()
        if value.lower() == EMBEDDED_ALIAS:
            return ORIGINAL_HUB_ID
        if _HUB_ID_RE.match(value) and not value.startswith((".", "/")) and not Path(value).is_absolute():
            return value
    return None


def license_for(manifest: dict[str, Any], base_model: str | None) -> str:
    explicit = _dict(manifest.get("model")).get("license") or manifest.get("license")
    if isinstance(explicit, str) and explicit.strip():
        return explicit.strip()
    name = (base_model or "").lower()
    for fragment, license_id in _LICENSE_BY_NAME:
        if fragment in name:
            return license_id
    return "other"


def _hub_datasets(manifest: dict[str, Any]) -> list[str]:
    """Hub dataset ids recorded by the data stage, whatever shape the record has."""
    data = _dict(_train_record(manifest).get("data"))
    found: list[str] = []

    def visit(value: Any, key: str | None = None) -> None:
        if isinstance(value, str):
            if key in (None, "repo_id", "dataset", "dataset_id", "id", "name") and _HUB_ID_RE.match(value):
                if value not in found:
                    found.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, k)
        elif isinstance(value, list):
            for item in value:
                visit(item, key)

    for key in ("hub", "hub_datasets", "datasets"):
        if key in data:
            visit(data[key])
    return found


def _backend_label(manifest: dict[str, Any]) -> str:
    """How stage 03 trained: its engine plan when recorded (it may differ from stage 02's backend)."""
    model = _dict(manifest.get("model"))
    plan = _dict(_dict(_train_record(manifest).get("metrics")).get("engine"))
    backend = plan.get("backend") or model.get("backend")
    label = {"unsloth": "Unsloth (GPU)", "hf": "Transformers + PEFT + TRL"}.get(backend, str(backend or NOT_AVAILABLE))
    if plan.get("compile_layers"):
        label += ", capas compiladas con torch.compile"
    if plan.get("attn_implementation") == "flex_attention":
        label += " y atención flex"
    elif plan.get("attn_implementation") == "sdpa" and plan.get("engine") == "compiled":
        label += ", atención SDPA (flex no corría en esta GPU)"
    if model.get("load_in_4bit"):
        label += ", base cargada en 4 bits (QLoRA)"
        if plan.get("dequantize_4bit"):
            label += f" y descuantizada una vez a {plan.get('precision') or 'bf16'}"
    if plan.get("fp8_base"):
        # Whoever reuses the adapter should know its base products were rounded to e4m3 while it learned.
        drift = plan.get("fp8_drift")
        label += ", productos de la base congelada en FP8 (e4m3)" + (
            f"; en la comprobación previa la pérdida cambió un {engine.percent(drift)} frente a bf16"
            if isinstance(drift, (int, float)) else "")
    return label


# ------------------------------------------------------------------------------------------ formatting


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return NOT_AVAILABLE
    if isinstance(value, bool):
        return "sí" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or NOT_AVAILABLE
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or NOT_AVAILABLE
    return str(value)


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {label} | {_fmt(value).replace('|', '/')} |" for label, value in rows]
    return "\n".join(lines)




# ------------------------------------------------------------------------------------------- sections


def _metadata(kind: str, manifest: dict[str, Any], base_model: str | None) -> str:
    from huggingface_hub import ModelCardData

    backend = _dict(manifest.get("model")).get("backend")
    tags = ["lora", "unsloth" if backend == "unsloth" else "peft", "trl", "sft", "español"]
    if not _own_topic(manifest):
        tags += ["biología", "fotosíntesis", "ciencias-de-la-vida"]
    if kind == "gguf":
        tags.append("gguf")
    data = ModelCardData(
        language=["es"],
        license=license_for(manifest, base_model),
        library_name=LIBRARY_BY_KIND[kind],
        base_model=base_model,
        tags=tags,
        datasets=_hub_datasets(manifest) or None,
        pipeline_tag="text-generation",
    )
    return data.to_yaml()


def _intro(kind: str, base_model: str | None, repo_id: str | None, manifest: dict[str, Any]) -> str:
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "un modelo base pequeño"
    what = {
        "merged": "el **modelo completo** (los pesos LoRA ya fusionados con la base, en 16 bits), listo "
        "para cargarlo con `transformers`",
        "adapter": "el **adaptador LoRA** (solo los pesos entrenados); se carga con `peft` encima del "
        "modelo base",
        "gguf": "el modelo en formato **GGUF**, para usarlo con llama.cpp u Ollama sin GPU",
    }[kind]
    if _own_topic(manifest):
        title = repo_id.split("/")[1] if repo_id else "Asistente en español afinado con LoRA"
        topic = (f"Asistente en español ajustado con LoRA (fine-tuning supervisado) a partir de {base}, con estas "
                 f"instrucciones de sistema:\n\n> {system_prompt_of(manifest)}\n\n")
    else:
        title = repo_id.split("/")[1] if repo_id else "Asistente académico de ciencias de la vida"
        topic = (f"Asistente académico en español para ciencias de la vida (biología celular, fotosíntesis, "
                 f"genética...), ajustado con LoRA (fine-tuning supervisado) a partir de {base}. ")
    return f"# {title}\n\n{topic}Esta carpeta contiene {what}."


def _repo_structure(repo_id: str | None) -> str:
    if not repo_id:
        return ""
    return (
        "## Estructura del repositorio\n\n"
        f"| Carpeta de `{repo_id}` | Contenido | Biblioteca |\n| --- | --- | --- |\n"
        "| `/` (raíz) | modelo fusionado en 16 bits | transformers |\n"
        "| `adapter/` | adaptador LoRA | peft |\n"
        "| `gguf/` | archivos GGUF y Modelfile | llama.cpp / Ollama |\n\n"
        "Solo están las partes que se publicaron en esta ejecución."
    )


def _training(manifest: dict[str, Any]) -> str:
    settings = _settings(manifest)
    model = _dict(manifest.get("model"))
    rows = [(label, settings.get(key)) for key, label in _SETTINGS_ROWS]
    if settings.get("batch_size") and settings.get("grad_accum"):
        try:
            rows.append(("Lote efectivo", int(settings["batch_size"]) * int(settings["grad_accum"])))
        except (TypeError, ValueError):
            pass
    rows.append(("Motor de entrenamiento", _backend_label(manifest)))
    rows.append(("Modelo base", model.get("base_model")))
    metrics = _dict(_train_record(manifest).get("metrics"))
    metric_rows = [(_METRIC_LABELS.get(k, k), v) for k, v in metrics.items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    text = (
        "## Cómo se entrenó\n\n"
        "Ajuste fino supervisado (SFT) con LoRA; la pérdida solo cuenta los tokens de la respuesta, "
        "y cada ejemplo termina en un único token de fin para que el modelo aprenda a parar.\n\n"
        + _table(("Parámetro", "Valor"), rows)
        + "\n\nInstrucción de sistema usada en el entrenamiento (úsala también al generar):\n\n"
        + f"> {system_prompt_of(manifest)}"
    )
    if metric_rows:
        text += "\n\n### Métricas del entrenamiento\n\n" + _table(("Métrica", "Valor"), metric_rows)
    return text


def _data(manifest: dict[str, Any]) -> str:
    data = _dict(_train_record(manifest).get("data"))
    rows = [(label, data.get(key)) for key, label in _DATA_ROWS]
    datasets = _hub_datasets(manifest)
    rows.append(("Conjuntos del Hub", datasets or "ninguno (solo archivos locales)"))
    topic = "" if _own_topic(manifest) else " de ciencias de la vida"
    return (
        "## Datos\n\n"
        f"Conversaciones en español (pares instrucción/respuesta o diálogos de varios turnos){topic}, "
        "deduplicadas y separadas en entrenamiento y evaluación.\n\n" + _table(("Dato", "Valor"), rows)
    )


def _contrast(contrast_md: str | None) -> str:
    body = contrast_md.strip() if isinstance(contrast_md, str) and contrast_md.strip() else (
        "El informe de contraste no está disponible: lo genera la etapa 04 "
        "(python 04_inference_and_export.py)."
    )
    return "## Resultados: antes y después del ajuste\n\n" + body


def _repetition_penalty(manifest: dict[str, Any]) -> float:
    """The penalty 02 recorded (--repetition-penalty), which the contrast test and the Modelfile use."""
    value = _dict(manifest.get("generation")).get("repetition_penalty")
    return float(value) if isinstance(value, (int, float)) else DEFAULT_REPETITION_PENALTY


def _chat_snippet(load_lines: str, manifest: dict[str, Any]) -> str:
    system = json.dumps(system_prompt_of(manifest), ensure_ascii=False)
    question = json.dumps(_example_question(manifest), ensure_ascii=False)
    return (
        "```python\n"
        f"{load_lines}\n\n"
        "mensajes = [\n"
        f'    {{"role": "system", "content": {system}}},\n'
        f'    {{"role": "user", "content": {question}}},\n'
        "]\n"
        "entrada = tokenizer.apply_chat_template(\n"
        '    mensajes, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
        ")\n"
        f"salida = modelo.generate(**entrada, max_new_tokens=256, do_sample=False, "
        f"repetition_penalty={_repetition_penalty(manifest):g})\n"
        'respuesta = salida[0][entrada["input_ids"].shape[1]:]\n'
        "print(tokenizer.decode(respuesta, skip_special_tokens=True))\n"
        "```"
    )


def _example_question(manifest: dict[str, Any]) -> str:
    return "Escribe aquí tu pregunta." if _own_topic(manifest) else EXAMPLE_QUESTION


def _usage_merged(folder: Path, repo_id: str | None, manifest: dict[str, Any]) -> str:
    source = json.dumps(repo_id or str(folder))
    load = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({source})\n"
        f"modelo = AutoModelForCausalLM.from_pretrained({source})"
    )
    return "### Con transformers\n\n" + _chat_snippet(load, manifest)


def _usage_adapter(folder: Path, repo_id: str | None, base_model: str | None, manifest: dict[str, Any]) -> str:
    base = json.dumps(base_model or "ID_DEL_MODELO_BASE")
    where = f"{json.dumps(repo_id)}, subfolder=\"adapter\"" if repo_id else json.dumps(str(folder))
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer_source = where if has_tokenizer else base
    load = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base})\n"
        f"modelo = PeftModel.from_pretrained(base, {where})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_source})"
    )
    return (
        "### Con transformers + peft\n\n" + _chat_snippet(load, manifest)
        + "\n\nPara obtener un modelo sin dependencia de `peft`, fusiona los pesos con "
        "`modelo = modelo.merge_and_unload()`."
    )


def _gguf_type_note(file_name: str) -> str:
    """' — Q4_K_M: …' for a file named like the exporter's (model-<type>.gguf), else nothing."""
    stem = file_name.lower().removesuffix(".gguf")
    found = next((t for t in TYPE_DESCRIPTIONS if stem.endswith(f"-{t}")), None)
    return f" — {TYPE_DESCRIPTIONS[found]}" if found else ""


def _usage_gguf(folder: Path, repo_id: str | None, manifest: dict[str, Any]) -> str:
    ggufs = sorted(p.name for p in folder.glob("*.gguf")) or ["modelo.gguf"]
    modelfile = folder / "Modelfile"
    files = " ".join(f"gguf/{name}" for name in ggufs[:1]) + (" gguf/Modelfile" if modelfile.is_file() else "")
    download = (
        f"```bash\nhf download {repo_id} {files} --local-dir .\ncd gguf\n```\n\n" if repo_id else ""
    )
    if modelfile.is_file():
        modelfile_text = modelfile.read_text(encoding="utf-8").strip()
        modelfile_part = "El `Modelfile` incluido (plantilla de chat e instrucción de sistema):\n\n"
    else:
        modelfile_text = f"FROM ./{ggufs[0]}"
        modelfile_part = "Crea un archivo `Modelfile` junto al GGUF con este contenido:\n\n"
    listing = "\n".join(
        f"- `{p.name}` ({p.stat().st_size / 1e6:.1f} MB){_gguf_type_note(p.name)}" for p in sorted(folder.glob("*.gguf"))
    ) or "- (todavía no hay archivos .gguf en esta carpeta)"
    return (
        "### Con Ollama\n\n"
        f"Archivos GGUF:\n\n{listing}\n\n"
        f"{download}{modelfile_part}```text\n{modelfile_text}\n```\n\n"
        "```bash\n"
        "ollama create asistente-bio -f Modelfile\n"
        f'ollama run asistente-bio "{_example_question(manifest)}"\n'
        "```\n\n"
        "### Con llama.cpp\n\n"
        f"```bash\nllama-cli -m {ggufs[0]} -cnv\n```"
    )


def _usage(kind: str, folder: Path, repo_id: str | None, base_model: str | None, manifest: dict[str, Any]) -> str:
    body = {
        "merged": lambda: _usage_merged(folder, repo_id, manifest),
        "adapter": lambda: _usage_adapter(folder, repo_id, base_model, manifest),
        "gguf": lambda: _usage_gguf(folder, repo_id, manifest),
    }[kind]()
    return "## Cómo usarlo\n\nPregunta siempre con la plantilla de chat y la misma instrucción de sistema " \
           "que en el entrenamiento.\n\n" + body


def _limitations(manifest: dict[str, Any]) -> str:
    scope = ("en preguntas del tema de sus instrucciones de sistema" if _own_topic(manifest)
             else "en preguntas de ciencias de la vida")
    return (
        "## Limitaciones\n\n"
        "- Es un modelo pequeño ajustado con pocos datos: puede equivocarse, inventar datos o referencias "
        "y mezclar conceptos. Comprueba cada respuesta con fuentes fiables.\n"
        "- Está pensado como apoyo al estudio; no sirve para consejo médico, diagnóstico ni decisiones "
        "clínicas o de seguridad.\n"
        f"- Solo se ha evaluado en español y {scope}; fuera de ese ámbito su "
        "calidad es la del modelo base o peor.\n"
        "- Hereda los sesgos y limitaciones del modelo base y de los datos de entrenamiento."
    )


def _license_section(license_id: str, base_model: str | None) -> str:
    text = f"## Licencia\n\n`{license_id}`, la del modelo base"
    text += f" ({base_model})." if base_model else "."
    if license_id.startswith("llama"):
        text += (
            " Built with Llama: su uso está sujeto a la licencia comunitaria de Llama y a su política de "
            "uso aceptable."
        )
    return text


# ----------------------------------------------------------------------------------------------- API


def render_model_card(
    folder: str | os.PathLike,
    *,
    kind: str = "merged",
    manifest: dict[str, Any] | None,
    contrast_md: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The README.md text: Hub YAML front matter, then the Spanish card body. Never contains a token."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    folder = Path(folder)
    manifest = _dict(manifest)
    base_model = base_model_id(manifest)
    sections = [
        _intro(kind, base_model, repo_id, manifest),
        _repo_structure(repo_id),
        _training(manifest),
        _data(manifest),
        _contrast(contrast_md),
        _usage(kind, folder, repo_id, base_model, manifest),
        _limitations(manifest),
        _license_section(license_for(manifest, base_model), base_model),
    ]
    body = "\n\n".join(s for s in sections if s)
    card = f"---\n{_metadata(kind, manifest, base_model)}\n---\n\n{body}\n"
    return redact(card, (os.environ.get("HF_TOKEN") or "").strip())


def write_model_card(
    folder: str | os.PathLike,
    *,
    kind: str = "merged",
    manifest: dict[str, Any] | None,
    contrast_md: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write `folder/README.md` atomically and return its path."""
    text = render_model_card(folder, kind=kind, manifest=manifest, contrast_md=contrast_md, repo_id=repo_id)
    path = Path(folder) / "README.md"
    atomic.write_text(path, text)
    return path
