"""Ranges and types of every setting, shared by the command-line flags and the run.json schema.

One table, so that a value refused on the command line is refused in the same words when it comes from a
damaged or hand-edited run.json, and so that no value is silently replaced by a default later on (a
`--batch-size 0` used to train with 4 while the log said 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from afinar.core.errors import UserError


@dataclass(frozen=True)
class Rule:
    kind: str  # "int", "number", "bool", "text", "choice", "formats"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be strictly above `low`
    high_open: bool = False  # True: strictly below `high`
    nullable: bool = False  # None means "automatic" / "no limit" where the setting has such a meaning
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """The accepted values, in Spanish, for the message."""
        if self.kind == "bool":
            return "true o false"
        if self.kind == "text":
            return "un texto no vacío" + (f" de {_num(self.high)} caracteres como mucho" if self.high else "")
        if self.kind in ("choice", "formats"):
            return "uno de " + ", ".join(self.choices)
        noun = "un número entero" if self.kind == "int" else "un número finito"
        parts = []
        if self.low is not None:
            parts.append(f"{'mayor que' if self.low_open else 'al menos'} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'menor que' if self.high_open else 'como mucho'} {_num(self.high)}")
        return noun + (" " + " y ".join(parts) if parts else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


SEED_MAX = 2**32 - 1  # numpy's RandomState, seeded by the trainer, accepts no more
# Below this no example keeps a single response token once the chat template is applied: nothing to learn.
MIN_SEQ_LENGTH = 32
SYSTEM_PROMPT_MAX = 2000  # characters

RULES: dict[str, Rule] = {
    # stage 02 (the adapter's shape)
    "lora_r": Rule("int", low=1, high=4096),
    "lora_alpha": Rule("int", low=1, high=65536),
    "lora_dropout": Rule("number", low=0, high=1, high_open=True),
    "lora_layers": Rule("int", low=1, high=4096, nullable=True),  # None: every layer
    "model": Rule("text"),
    "base_path": Rule("text"),
    "backend": Rule("choice", choices=("hf", "unsloth")),
    "load_in_4bit": Rule("bool"),
    "precision": Rule("choice", choices=("fp32", "bf16", "fp16")),
    "max_new_tokens": Rule("int", low=1, high=32768),
    "gen_batch_size": Rule("int", low=1, high=4096),
    "repetition_penalty": Rule("number", low=0, low_open=True, high=100),
    # Every training example carries it: a page of text would crowd out the answers in max_seq_length.
    "system_prompt": Rule("text", high=SYSTEM_PROMPT_MAX),
    # stage 03 (training)
    "max_seq_length": Rule("int", low=MIN_SEQ_LENGTH, high=1_048_576),
    "learning_rate": Rule("number", low=0, low_open=True),
    "epochs": Rule("number", low=0, low_open=True, high=100_000),
    "loraplus_lr_ratio": Rule("number", low=1, high=1000, nullable=True),  # null in a run.json from before it existed
    "max_steps": Rule("int", low=1, high=10**9, nullable=True),
    "batch_size": Rule("int", low=1, high=65536, nullable=True),
    "grad_accum": Rule("int", low=1, high=65536),
    "seed": Rule("int", low=0, high=SEED_MAX),
    "warmup_ratio": Rule("number", low=0, high=1, high_open=True),
    "save_steps": Rule("int", low=1, high=10**9),
    "save_minutes": Rule("number", low=0, low_open=True, high=10**6),
    "logging_steps": Rule("int", low=1, high=10**9),
    "eval_steps": Rule("int", low=1, high=10**9, nullable=True),  # None: no periodic evaluation
    "packing": Rule("bool", nullable=True),
    "engine": Rule("choice", choices=("auto", "unsloth", "compiled", "eager"), nullable=True),
    "fp8": Rule("bool", nullable=True),
    # preference training after SFT (afinar.train.preference); null in a run.json from before they existed
    "preference": Rule("choice", choices=("auto", "dpo", "orpo", "none"), nullable=True),
    "dpo_beta": Rule("number", low=0, low_open=True, high=100, nullable=True),
    "orpo_beta": Rule("number", low=0, low_open=True, high=100, nullable=True),
    "preference_epochs": Rule("number", low=0, low_open=True, high=100_000, nullable=True),
    "preference_learning_rate": Rule("number", low=0, low_open=True, high=1, nullable=True),
    "hub_ratio": Rule("number", low=0, high=1, high_open=True),
    "mix_ratio": Rule("number", low=0, low_open=True, high=1, high_open=True),
    "eval_fraction": Rule("number", low=0, high=1, high_open=True),
    # stage 04
    "gguf": Rule("formats", choices=("f16", "q8_0", "none")),  # the writer's own list, when it loads: gguf_formats()
    "what": Rule("formats", choices=("adapter", "merged", "gguf")),  # what --push uploads
}


def problem(name: str, value: Any) -> str | None:
    """Why `value` is not acceptable for setting `name` (Spanish, without the name), or None if it is."""
    rule = RULES[name]
    if value is None:
        return None if rule.nullable else f"falta el valor; debe ser {rule.describe()}"
    if rule.kind == "bool":
        return None if isinstance(value, bool) else f"{_shown(value)} no vale; debe ser {rule.describe()}"
    if rule.kind == "text":
        if not isinstance(value, str) or not value.strip():
            return f"{_shown(value)} no vale; debe ser {rule.describe()}"
        if rule.high is not None and len(value) > rule.high:
            return f"tiene {len(value)} caracteres; debe ser {rule.describe()}"
        if name == "system_prompt" and '"""' in value:
            # The Ollama Modelfile wraps it in triple quotes, which cannot be escaped there.
            return 'contiene comillas triples (""") y no puede ir en el Modelfile de Ollama; quítalas'
        return None
    if rule.kind == "choice":
        return None if value in rule.choices else f"{_shown(value)} no vale; debe ser {rule.describe()}"
    if rule.kind == "formats":
        choices = gguf_formats() if name == "gguf" else rule.choices
        parts = [p.strip() for p in str(value).split(",")] if isinstance(value, str) else None
        if not parts or not all(parts) or any(p not in choices for p in parts):
            return f"{_shown(value)} no vale; debe ser una lista separada por comas de {', '.join(choices)}"
        return None
    # bool is an int subclass in Python; true/false in run.json is never a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{_shown(value)} no vale; debe ser {rule.describe()}"
    if rule.kind == "int" and not isinstance(value, int):
        return f"{_shown(value)} no vale; debe ser {rule.describe()}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_shown(value)} no vale; debe ser {rule.describe()}"
    too_low = rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low)
    too_high = rule.high is not None and (value >= rule.high if rule.high_open else value > rule.high)
    if too_low or too_high:
        return f"{_shown(value)} está fuera de rango; debe ser {rule.describe()}"
    return None


def gguf_formats() -> tuple[str, ...]:
    """The GGUF types the exporter writes (asked of afinar.export.gguf_export, so a new type is accepted here as
    soon as it is written there), and "none"."""
    try:
        # Delayed: the GGUF writer loads numpy, and every script's parser (--help too) imports this module.
        from afinar.export.gguf_export import _out_types

        return (*_out_types(), "none")
    except ImportError:  # the gguf package missing: the export itself will say so
        return RULES["gguf"].choices


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return "un número de más de 60 cifras"  # str() itself refuses past 4,300 digits
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    if value is None:
        text = "null"
    # A 5,000-digit number or a whole document pasted into a field would drown the message.
    return text if len(text) <= 60 else text[:57] + "..."


def require_writable(folder, option: str = "--output-dir") -> None:
    """Refuse, before any model is loaded, a folder this process may not write into (a read-only mount, a
    folder of another user): the failure would otherwise come after minutes of work, in English."""
    import os
    from pathlib import Path

    folder = Path(folder)
    existing = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: no hay permiso para escribir en {existing}. Elige otro {option} o "
                        f"corrige sus permisos.")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
