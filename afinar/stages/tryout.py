"""The notebook's "prueba el modelo" cell: one question answered as it is generated, then a small chat.

It runs inside the notebook kernel (the stages run as child processes, so the GPU is free by then) and loads
the tuned model exactly as `04_inference_and_export.py --chat` does: the base recorded in run.json with the
trained adapter, the same chat template, and the repetition penalty stage 02 recorded for "antes" and
"después", so what the user tries here is what the contrast measured.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from afinar.core import manifest
from afinar.core.environment import detect_device
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.models import free_gpu_memory
from afinar.core.prompts import configure_from_manifest
from afinar.evaluate import generation
from afinar.train import modeling

# Room for a full paragraph: the contrast caps answers at its recorded limit, a conversation deserves more.
MIN_CHAT_TOKENS = 300


def load_tuned(output_dir: str | Path):
    """(model, tokenizer, run_manifest) for the adapter stage 03 trained in `output_dir`."""
    layout = OutputLayout.at(output_dir)
    run_manifest = manifest.read(layout)
    manifest.require_stage(run_manifest, "train", layout)
    modeling.ensure_base_path(run_manifest)
    settings = run_manifest["settings"]
    print("Cargando el modelo afinado ...", flush=True)
    model, tokenizer = modeling.build(settings, detect_device(), settings.get("precision", "fp32"),
                                      adapter_dir=layout.adapter)
    model.eval()
    return model, tokenizer, run_manifest


def try_model(output_dir: str | Path, question: str | None, *, chat: bool = True, max_new_tokens: int | None = None,
              input_fn: Callable[[str], str] | None = None, output: TextIO | None = None) -> list[dict[str, str]]:
    """Answer `question` with streaming output, then chat until an empty line or "salir" (if `chat`).
    `max_new_tokens` None: MIN_CHAT_TOKENS, or the contrast's recorded limit if larger."""
    try:
        model, tokenizer, run_manifest = load_tuned(output_dir)
    except UserError as err:
        # In the notebook a traceback would bury the one line that says what to do.
        print(f"ERROR: {err}", file=sys.stderr)
        return []
    configure_from_manifest(run_manifest)
    recorded = run_manifest.get("generation", {})
    try:
        return generation.chat(
            model, tokenizer,
            max_new_tokens=max_new_tokens or max(MIN_CHAT_TOKENS, int(recorded.get("max_new_tokens", 0))),
            repetition_penalty=recorded.get("repetition_penalty", generation.DEFAULT_REPETITION_PENALTY),
            input_fn=input_fn or input, output=output or sys.stdout, first_question=question, interactive=chat,
        )
    finally:
        # The notebook keeps running after this cell (a push, another try): give the memory back.
        del model
        free_gpu_memory()
