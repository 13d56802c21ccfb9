"""An Ollama Modelfile beside the GGUF: the same chat format, system prompt and stop tokens as training."""

from __future__ import annotations

import os
from pathlib import Path

from afinar.core import atomic
from afinar.core.errors import UserError
from afinar.core.prompts import system_prompt as run_system_prompt
from afinar.evaluate.generation import DEFAULT_REPETITION_PENALTY

# Ollama renders these with Go's text/template, one turn at a time, and cuts the text after
# {{ .Response }} on the turn being generated, so the end-of-turn token after it only closes past turns.
CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{preamble}{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
# Llama 3.1/3.2 templates open the system turn with these lines; "26 Jul 2024" is the template's own
# date when it is rendered without a clock. No BOS here: llama.cpp adds it (tokenizer.ggml.add_bos_token).
LLAMA3_DATE_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

FAMILIES = {
    "chatml": {"template": CHATML_TEMPLATE, "stop": ("<|im_end|>", "<|im_start|>")},
    "llama3": {"template": LLAMA3_TEMPLATE, "stop": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")},
}

# Low temperature: a small model drifts off topic quickly, and an academic answer wants precision more
# than variety. The mild repeat penalty stops the loops small models fall into on long answers; it is the
# one the contrast test generates with, so Ollama answers like the report says.
TEMPERATURE = 0.3
REPEAT_PENALTY = DEFAULT_REPETITION_PENALTY
NUM_CTX = 2048


def detect_family(chat_template: str | None, vocab: dict[str, int] | None = None) -> str:
    """'llama3' or 'chatml', from the chat template's markers, else from the special tokens."""
    template = chat_template or ""
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    vocab = vocab or {}
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    raise UserError(
        "No se reconoce el formato de chat del tokenizador (ni ChatML <|im_start|> ni Llama 3 "
        "<|start_header_id|>): no se puede escribir la plantilla del Modelfile de Ollama."
    )


def ollama_template(family: str, chat_template: str | None = None) -> str:
    """The Go template for `family`; a Llama 3 template's knowledge-date lines are kept when it has them."""
    template = FAMILIES[family]["template"]
    if family == "llama3":
        preamble = LLAMA3_DATE_PREAMBLE if "Cutting Knowledge Date" in (chat_template or "") else ""
        template = template.replace("{preamble}", preamble)
    return template


def modelfile_text(gguf_relative: str, family: str, system_prompt: str | None = None,
                   chat_template: str | None = None, gguf_type: str | None = None,
                   repetition_penalty: float | None = None) -> str:
    """`system_prompt` None: the run's (afinar.core.prompts.system_prompt, set from run.json).
    `repetition_penalty` None: the default; otherwise the one 02 recorded, which the contrast test used."""
    spec = FAMILIES[family]
    system_prompt = run_system_prompt() if system_prompt is None else system_prompt
    if '"""' in system_prompt:
        raise UserError('El prompt de sistema no puede contener """ (delimita los bloques del Modelfile).')
    lines = [f"FROM {gguf_relative}"]
    if gguf_type:
        # Ollama ignores lines starting with #; the note says which quantization the file holds.
        lines.append(f"# Tipo GGUF: {gguf_type}")
    lines += [
        "",
        f'TEMPLATE """{ollama_template(family, chat_template)}"""',
        "",
        f'SYSTEM """{system_prompt}"""',
        "",
    ]
    lines += [f'PARAMETER stop "{token}"' for token in spec["stop"]]
    lines += [
        f"PARAMETER temperature {TEMPERATURE}",
        f"PARAMETER repeat_penalty {REPEAT_PENALTY if repetition_penalty is None else repetition_penalty:g}",
        f"PARAMETER num_ctx {NUM_CTX}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, out_path: str | Path, tokenizer,
                    gguf_type: str | None = None, repetition_penalty: float | None = None) -> dict[str, str]:
    """Write the Modelfile at `out_path`, pointing at `gguf_path` relatively so the folder can move."""
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if not gguf_path.exists():
        raise UserError(f"No existe {gguf_path}: exporta antes el modelo a GGUF.")
    relative = os.path.relpath(gguf_path.absolute(), out_path.absolute().parent)
    relative = relative if relative.startswith(".") else f"./{relative}"
    chat_template = getattr(tokenizer, "chat_template", None)
    family = detect_family(chat_template, tokenizer.get_vocab())
    atomic.write_text(out_path, modelfile_text(relative, family, chat_template=chat_template, gguf_type=gguf_type,
                                               repetition_penalty=repetition_penalty))
    return {"path": str(out_path), "from": relative, "family": family}
