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
    "lora_r": (16, 16, "rango 16: buen equilibrio entre capacidad y memoria; más alto aprende más y ocupa más"),
    "lora_alpha": (16, 32, "en GPU alpha = r (escala 1), la receta de los cuadernos de Unsloth; en CPU alpha = 2r "
                   "(escala 2): con 135M parámetros y pocos pasos, la perplejidad apartada bajó de 14,6 a 13,8 "
                   "(2 épocas) y a 13,1 con 3 (BENCHMARKS.md); sin --lora-alpha se mantiene la proporción para "
                   "otro --lora-r"),
    "lora_layers": (None, None, "todas las capas; con N, solo las N de arriba: el gradiente no baja de la primera "
                    "capa adaptada y en CPU las capas de debajo se calculan una vez por fila, así que cada época "
                    "cuesta unas 3 veces menos con N=4, pero aprende bastante menos (perplejidad × 0,58 frente a "
                    "× 0,42, BENCHMARKS.md)"),
    "lora_dropout": (0.0, 0.0, "0: con pocas épocas no hace falta regularizar y Unsloth lo acelera"),
    "max_seq_length": (2048, 640, "2048 en GPU cubre ensayos largos; 640 en CPU cubre el ensayo más largo de "
                       "tu_dataset.json (599 tokens con la plantilla) sin pagar filas de 2048"),
    "learning_rate": (2e-4, 2e-3, "2e-4 es lo habitual en QLoRA; en CPU, con ~100 pasos, el modelo de 135M necesita más: "
                      "2e-3 dio perplejidad 14,6 frente a 16,5 con 1e-3 (2 épocas, alpha = r), todas las respuestas "
                      "con EOS y menos bucles"),
    "epochs": (3.0, 3.0, "3 pasadas por ~200 entradas fijan el estilo sin memorizarlo; en CPU, 3 (105 pasos, "
               "~12 minutos con 2 núcleos) en lugar de 2: la perplejidad apartada queda en 0,33 veces la del modelo "
               "base (0,35 con 2) y las respuestas con bucles bajan de 6 a 3 de 10 sin tocar la generación"),
    "max_steps": (None, None, "sin límite: manda --epochs; úsalo para pruebas rápidas"),
    "batch_size": (None, 4, "en GPU, automático según el motor y la memoria de la tarjeta (32 filas de 2048 en la "
                   "H200, 8 con Unsloth); 4 en CPU, donde más lote no da más velocidad con 2 núcleos"),
    "grad_accum": (1, 1, "1: con lotes de 4-8 y pocas entradas, acumular solo reduce el número de pasos"),
    "seed": (42, 42, "fija el orden de los datos y la inicialización de LoRA para poder repetir el resultado"),
    "warmup_ratio": (0.05, 0.05, "un calentamiento corto evita pasos bruscos al principio"),
    "save_steps": (100, 50, "guardar cada N pasos; además se guarda cada --save-minutes"),
    "save_minutes": (10.0, 10.0, "una desconexión de Colab pierde como mucho 10 minutos de trabajo"),
    "logging_steps": (5, 5, "una línea de registro cada 5 pasos"),
    "eval_steps": (50, None, "pérdida de evaluación sobre las entradas apartadas cada N pasos, en metrics.jsonl y "
                   "loss.png; en GPU cada 50 (cuesta menos que un paso); en CPU, sin evaluación periódica salvo que "
                   "la pidas: con 2 núcleos cada evaluación cuesta varios pasos de entrenamiento"),
    "packing": (None, True, "empaquetar en orden evita calcular relleno (un tercio de los tokens de un lote que mezcla "
                "ensayos y respuestas cortas); en GPU, automático: sí con el motor compilado, no con Unsloth"),
    "engine": ("auto", "auto", "auto: en GPU de 14 GiB o más (la T4 incluida, en fp16), transformers + PEFT compilado con "
               "atención flex (el más rápido medido); en GPU más pequeñas, Unsloth; en CPU, eager"),
    "fp8": (None, False, "en GPU, automático: sí con el motor compilado en tarjetas Hopper o posteriores (H100, H200), "
            "que multiplican en FP8 al doble de ritmo que en bf16, y solo si en tus propios ejemplos la pérdida "
            "cambia menos de un 1 por ciento; solo la base congelada se redondea, LoRA aprende en bf16"),
    "preference": ("auto", "auto", "auto: tras el SFT, entrenamiento de preferencias (DPO) con las entradas que traen "
                   "'rejected' (el error típico): el dato correcto debe ganar al error, no solo ser probable; "
                   "'none' lo omite"),
    "dpo_beta": (0.1, 0.1, "beta de DPO: cuánto puede alejarse el modelo del de después del SFT; 0,1 es lo habitual"),
    "preference_epochs": (2.0, 2.0, "pasadas por los pares (correcta, error): con 2 (20 pasos de 8 pares en CPU) el "
                          "modelo ya prefiere la respuesta correcta en todos los pares de entrenamiento; cada paso "
                          "cuesta como uno de SFT (~17 s con 2 núcleos AVX2)"),
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
              "preference", "dpo_beta", "preference_epochs", "preference_learning_rate")


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
