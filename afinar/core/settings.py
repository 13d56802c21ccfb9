"""Defaults, chosen per device, and how later stages inherit them from run.json.

Each default carries the trade-off that picked it; the --help texts quote these reasons.
"""

from __future__ import annotations

from typing import Any

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GPU_DEFAULT_MODEL = "unsloth/Llama-3.2-1B-Instruct"
CPU_DEFAULT_MODEL = "smollm2-135m"

# name -> (gpu default, cpu default, why)
DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "lora_r": (16, 16, "más alto aprende más y ocupa más memoria"),
    "lora_alpha": (16, 32, "alpha = r en GPU (la receta de Unsloth) y 2r en CPU, donde con pocos pasos baja más la "
                   "perplejidad (BENCHMARKS.md); sin --lora-alpha, la misma proporción para otro --lora-r"),
    "lora_layers": (None, None, "todas las capas; con N, solo las N de arriba: en CPU cada época cuesta mucho menos, "
                    "pero el modelo aprende bastante menos (BENCHMARKS.md)"),
    "lora_dropout": (0.0, 0.0, "con pocas épocas no hace falta regularizar, y sin dropout Unsloth va más rápido"),
    "max_seq_length": (2048, 640, "más largo cabe más texto por ejemplo y cuesta más memoria; 640 en CPU cubre el "
                       "ensayo más largo de tu_dataset.json"),
    "learning_rate": (2e-4, 1.5e-3, "2e-4 es lo habitual en QLoRA; en CPU, con ~130 pasos de una fila, el modelo de "
                      "135M necesita más: con 1,5e-3 (y LoRA+ 4) y 0,9 épocas cumple la perplejidad apartada con "
                      "todas las respuestas terminadas en EOS (BENCHMARKS.md)"),
    "epochs": (3.0, 0.9, "más épocas fijan mejor el estilo y la perplejidad apartada, con riesgo de memorizar; en "
               "CPU, 0,9 épocas de las 461 entradas en pasos de una fila, con LoRA+, cumplen la perplejidad apartada "
               "con un 28 por ciento menos de tokens que 1,25 épocas en pasos de cuatro (BENCHMARKS.md)"),
    "loraplus_lr_ratio": (1.0, 4.0, "LoRA+: la tasa de las matrices B de LoRA sobre la de las A; 1 es LoRA de siempre. "
                          "En CPU, 4 deja con 0,9 épocas casi la misma perplejidad apartada que 1 época sin él "
                          "(BENCHMARKS.md)"),
    "max_steps": (None, None, "sin límite: manda --epochs; úsalo para pruebas rápidas"),
    "batch_size": (None, 1, "en GPU, automático según el motor y la memoria de la tarjeta; en CPU, una fila "
                   "empaquetada por paso: cada token cuesta lo mismo que en lotes de 4, y con los mismos tokens hay "
                   "4 veces más pasos, con los que el modelo aprende más (BENCHMARKS.md)"),
    "grad_accum": (1, 1, "con lotes de 4-8 y pocas entradas, acumular solo reduce el número de pasos"),
    "seed": (42, 42, "fija el orden de los datos y la inicialización de LoRA para poder repetir el resultado"),
    "warmup_ratio": (0.05, 0.05, "un calentamiento corto evita pasos bruscos al principio"),
    "save_steps": (100, 50, "guardar más a menudo pierde menos trabajo y cuesta más disco y tiempo"),
    "save_minutes": (10.0, 10.0, "una desconexión de Colab pierde como mucho ese tiempo de trabajo"),
    "logging_steps": (5, 5, "más a menudo da una curva de pérdida más fina y un registro más largo"),
    "eval_steps": (50, None, "pérdida de las entradas apartadas cada N pasos (metrics.jsonl, loss.png); en CPU solo "
                   "si la pides, porque cada evaluación cuesta varios pasos de entrenamiento"),
    "packing": (None, True, "empaquetar en orden evita calcular relleno; en GPU, automático: sí con el motor "
                "compilado, no con Unsloth"),
    "engine": ("auto", "auto", "auto: el motor más rápido medido que cabe en la tarjeta (compilado desde 14 GiB, "
               "Unsloth por debajo; eager en CPU; BENCHMARKS.md)"),
    "fp8": (None, False, "en GPU, automático: sí con el motor compilado en Hopper o posterior, que multiplica en FP8 "
            "más rápido, si la pérdida de tus ejemplos cambia menos de un 1 por ciento"),
    "preference": ("auto", "none", "auto: DPO tras el SFT con las entradas que traen 'rejected', para que el dato "
                   "correcto gane al error típico y no solo sea probable; 'none' lo omite. En CPU no se usa por "
                   "defecto: con el modelo de 135M y 2 épocas de SFT sube la sonda de errores de 22 a 27 de 35, pero "
                   "en AVX2 cuesta casi una hora (BENCHMARKS.md); 'dpo' lo pide. 'orpo' (solo en CPU) entrena la "
                   "preferencia dentro del mismo SFT: un 13 por ciento más de tokens y ninguna fase aparte"),
    "dpo_beta": (0.1, 0.1, "cuánto puede alejarse el modelo del que salió del SFT; 0,1 es lo habitual"),
    "orpo_beta": (1.0, 1.0, "con --preference orpo, el peso de la razón de probabilidades frente al SFT: con 1, la sonda "
                  "de errores pasó de 22 a 25-27 de 35 y la perplejidad apartada de × 0,314 a × 0,355 (con --epochs "
                  "1.5, × 0,310); con 3, 28 de 35 y × 0,42 (BENCHMARKS.md)"),
    "preference_epochs": (2.0, 2.0, "más pasadas por los pares (correcta, error) afianzan la preferencia y cuestan "
                          "como pasos de SFT (BENCHMARKS.md)"),
    "preference_learning_rate": (5e-5, 5e-4, "más baja que la del SFT: DPO mueve la diferencia entre dos respuestas "
                                 "y con pasos grandes las baja las dos"),
    # stage 04
    "merge_dtype": ("float16", "float16", "float16 guarda los cambios pequeños de LoRA que bfloat16 redondea "
                    "(BENCHMARKS.md), y es el formato del GGUF f16"),
}

# Settings fixed by stage 02 (the adapter's shape): 03 and 04 must not change them.
LOAD_KEYS = ("model", "base_path", "backend", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_layers")
TRAIN_KEYS = ("max_seq_length", "learning_rate", "epochs", "max_steps", "batch_size", "grad_accum", "seed",
              "warmup_ratio", "save_steps", "save_minutes", "logging_steps", "eval_steps", "packing", "engine", "fp8",
              "preference", "dpo_beta", "preference_epochs", "preference_learning_rate", "loraplus_lr_ratio",
              "orpo_beta")


def default(name: str, device_kind: str) -> Any:
    gpu, cpu, _ = DEFAULTS[name]
    return gpu if device_kind == "cuda" else cpu


def common_default(name: str) -> Any:
    """The default of a setting that does not depend on the device (a flag declared once for both)."""
    gpu, cpu, _ = DEFAULTS[name]
    if gpu != cpu:
        raise ValueError(f"{name}: el valor por defecto depende del dispositivo ({gpu} / {cpu})")
    return gpu


def lora_alpha_for(lora_r: int, device_kind: str) -> int:
    """The default alpha for a given rank: the same alpha/r ratio as the defaults (so --lora-r 32 keeps it)."""
    ratio = default("lora_alpha", device_kind) / default("lora_r", device_kind)
    return max(1, round(lora_r * ratio))


def why(name: str) -> str:
    return DEFAULTS[name][2]


AUTOMATIC_WHEN_NONE = ("batch_size", "packing", "fp8")  # None = chosen by afinar.train.engine from the card


def _shown(value: Any, name: str = "") -> str:
    if isinstance(value, bool):
        return "sí" if value else "no"
    if value is None:
        return "automático" if name in AUTOMATIC_WHEN_NONE else "ninguno"
    return str(value)


def help_text(name: str, text: str) -> str:
    gpu, cpu, reason = DEFAULTS[name]
    shown = _shown(gpu, name) if gpu == cpu else f"GPU {_shown(gpu, name)}, CPU {_shown(cpu, name)}"
    return f"{text} (por defecto: {shown}; {reason})"


def inherit(recorded: dict[str, Any], overrides: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Take each key from run.json unless a flag overrides it, and say which one won."""
    resolved = {}
    for key in keys:
        flag = "--" + key.replace("_", "-")
        value = overrides.get(key)
        if value is None:
            resolved[key] = recorded.get(key)
            print(f"  heredado de run.json: {key} = {resolved[key]}")
        else:
            if key in recorded and recorded[key] != value:
                print(f"  NOTA: {flag} {value} sustituye a {key} = {recorded[key]} de run.json")
            resolved[key] = value
    return resolved
