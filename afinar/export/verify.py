"""What merge and GGUF export share: the logit comparison that proves an exported model, and the free-space
check before writing one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable

from afinar.core.errors import UserError
from afinar.core.prompts import prompt_ids

# Fixed Spanish questions of the project's domain: the check reads the model exactly as it will be asked.
VERIFY_QUESTIONS = (
    "¿Qué es la fotosíntesis y dónde ocurre?",
    "Explica la función de las mitocondrias en la célula eucariota.",
    "¿En qué se diferencian la mitosis y la meiosis?",
    "Describe brevemente cómo actúa una enzima sobre su sustrato.",
)

# Room asked beyond the estimated size of what is written (headers, the tokenizer, filesystem slack).
SPACE_MARGIN = 1.1


def ensure_free_space(target: Path, needed_bytes: int, what: str) -> None:
    """Raise a Spanish UserError if the filesystem holding `target` lacks `needed_bytes`."""
    probe = Path(target).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise UserError(
            f"No hay espacio en disco para {what} en {target}: hacen falta unos {_gib(needed_bytes)} y "
            f"solo quedan {_gib(free)} libres en {probe}. Libera espacio o usa otro --output-dir."
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def verification_inputs(tokenizer, questions: Iterable[str] | None = None) -> list[list[int]]:
    """Token ids of each question as the model reads it: system prompt + chat template + assistant header."""
    questions = list(questions) if questions is not None else list(VERIFY_QUESTIONS)
    if not questions:
        raise UserError("La lista de preguntas de verificación está vacía.")
    if getattr(tokenizer, "chat_template", None):
        return [prompt_ids(tokenizer, {"instruction": q}) for q in questions]
    return [tokenizer(q)["input_ids"] for q in questions]


def compute_logits(model, inputs: list[list[int]]):
    """Logits of every real position of every prompt, in fp32, stacked into one [positions, vocab] tensor.

    One right-padded batch: a causal model never lets a real token see the padding after it, and one
    large matrix product is several times faster on a CPU than one per prompt.
    """
    import torch

    longest = max(len(ids) for ids in inputs)
    input_ids = torch.zeros((len(inputs), longest), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(inputs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
    return torch.cat([logits[row, : len(ids)].float().cpu() for row, ids in enumerate(inputs)], dim=0)


def compare_logits(reference, candidate) -> dict[str, Any]:
    """Distances that make sense for any model: absolute, relative to the logit spread, and top-1."""
    if reference.shape != candidate.shape:
        raise UserError(
            f"Las salidas no son comparables: el modelo de referencia da {tuple(reference.shape)} y el "
            f"exportado {tuple(candidate.shape)} (¿vocabulario distinto?)."
        )
    diff = (reference - candidate).abs()
    std = float(reference.std())
    max_abs = float(diff.max())
    return {
        "max_abs_logit_diff": max_abs,
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_std": std,
        "relative_max_diff": max_abs / std if std > 0 else float("inf"),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "positions": int(reference.shape[0]),
    }
