"""The frozen layers below the adapter, computed once per row instead of once per epoch.

With LoRA on the top N decoder layers only (`02 --lora-layers N`), the layers below are frozen and nothing
upstream of them trains: the hidden state that enters the lowest adapted layer is the same for a given row in
every epoch, and in the preference phase for every step that revisits a pair. On a CPU that lower stack is
most of a step (30 layers of SmolLM2 against the 4 adapted ones), so the first visit of a row stores its
hidden state and every later visit runs only the adapted layers, the final norm and the LM head.

Exact up to rounding: the adapted layers receive the same numbers they would compute themselves; padding
positions get zeros, which real tokens never attend to (padding is its own document in packed rows and lies
after every real token in right-padded ones) and which carry no labels. tests/test_frozen_prefix.py checks
the loss and the LoRA gradients against the plain forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from afinar.core.models import unwrap_peft

DEFAULT_MAX_BYTES = 2 * 1024**3  # past this, rows are computed every time instead of stored (a huge dataset)


class FrozenPrefix:
    """Hidden states entering decoder layer `start`, kept per row (its real tokens and positions)."""

    def __init__(self, causal_lm, start: int, max_bytes: int = DEFAULT_MAX_BYTES):
        self.causal_lm = causal_lm
        self.start = start
        self.max_bytes = max_bytes
        self.rows: dict[bytes, Any] = {}
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0

    def last_hidden_state(self, features: dict[str, Any], row_lengths: list[int]):
        """The model's last hidden state for this batch (input_ids + position_ids or attention_mask)."""
        import torch

        input_ids = features["input_ids"]
        positions = features.get("position_ids")
        keys = [self._key(input_ids[i, :n], None if positions is None else positions[i, :n])
                for i, n in enumerate(row_lengths)]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            # The missing rows as they came (same padding and mask), through the frozen layers only.
            subset = {name: value[missing] for name, value in features.items()}
            with torch.no_grad(), _only_layers(self.causal_lm.model, slice(0, self.start), final_norm=False):
                below = self.causal_lm.model(**subset, use_cache=False).last_hidden_state
            for j, i in enumerate(missing):
                fresh[i] = below[j, :row_lengths[i]]
                self._store(keys[i], fresh[i])
        width = input_ids.shape[1]
        first = fresh[missing[0]] if missing else self.rows[keys[0]]
        hidden = torch.zeros(len(keys), width, first.shape[-1], dtype=first.dtype, device=first.device)
        for i, (key, n) in enumerate(zip(keys, row_lengths)):
            hidden[i, :n] = fresh[i] if i in fresh else self.rows[key]
        top = {name: value for name, value in features.items() if name != "input_ids"}
        with _only_layers(self.causal_lm.model, slice(self.start, None), final_norm=True):
            return self.causal_lm.model(inputs_embeds=hidden, **top, use_cache=False).last_hidden_state

    def _store(self, key: bytes, value) -> None:
        size = value.numel() * value.element_size()
        if self.stored_bytes + size <= self.max_bytes:
            self.rows[key] = value.detach().clone()
            self.stored_bytes += size

    @staticmethod
    def _key(ids, positions) -> bytes:
        key = ids.detach().cpu().numpy().tobytes()
        return key if positions is None else key + b"|" + positions.detach().cpu().numpy().tobytes()

    def summary(self) -> dict[str, Any]:
        return {"start_layer": self.start, "rows_stored": len(self.rows), "stored_mib": round(self.stored_bytes / 2**20, 1),
                "hits": self.hits, "misses": self.misses}


@contextmanager
def _only_layers(inner, which: slice, final_norm: bool):
    """Run transformers' own forward over some of the decoder layers (and without the final norm for the
    lower part): the mask and rotary embeddings are built exactly as in a full forward."""
    import torch.nn as nn

    layers, norm = inner.layers, inner.norm
    inner.layers = nn.ModuleList(list(layers)[which])
    if not final_norm:
        inner.norm = nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm


def first_adapted_layer(peft_model) -> int | None:
    """The index of the lowest decoder layer with LoRA weights, or None when the model has no such stack."""
    causal_lm = unwrap_peft(peft_model)
    layers = getattr(getattr(causal_lm, "model", None), "layers", None)
    if layers is None or not hasattr(causal_lm.model, "norm"):
        return None
    for index, layer in enumerate(layers):
        if any("lora_" in name for name, _ in layer.named_parameters()):
            return index
    return None


def attach(peft_model) -> FrozenPrefix | None:
    """A prefix cache for this model where there is a frozen stack to skip (LoRA not on the lowest layer)."""
    start = first_adapted_layer(peft_model)
    if not start:
        return None
    causal_lm = unwrap_peft(peft_model)
    prefix = FrozenPrefix(causal_lm, start)
    causal_lm._afinar_frozen_prefix = prefix
    return prefix


def detach(peft_model) -> None:
    causal_lm = unwrap_peft(peft_model)
    causal_lm.__dict__.pop("_afinar_frozen_prefix", None)


def of(causal_lm) -> FrozenPrefix | None:
    return causal_lm.__dict__.get("_afinar_frozen_prefix")
