"""Etapa 02: carga el modelo base (4 bits + LoRA en GPU; fp32 + LoRA en CPU) y registra sus respuestas "antes".

Uso:
    python 02_load_model.py                       # modelo por defecto según el dispositivo
    python 02_load_model.py --model smollm2-135m  # modelo integrado, sin red
    python 02_load_model.py --model unsloth/Llama-3.2-1B-Instruct --lora-r 16 --output-dir salida

Crea el directorio de salida con run.json, el adaptador inicial y contraste/antes.jsonl.
"""

from afinar.core import cli, settings
from afinar.core.errors import main_guard


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", default=None,
                   help="id del Hub, carpeta local o 'smollm2-135m' (por defecto: unsloth/Llama-3.2-1B-Instruct "
                        "con GPU, smollm2-135m sin GPU: el integrado funciona sin red)")
    p.add_argument("--backend", choices=["auto", "unsloth", "hf"], default="auto",
                   help="auto: Unsloth si hay CUDA y está instalado, si no transformers + PEFT (por defecto: auto)")
    p.add_argument("--load-in-4bit", dest="load_in_4bit", action="store_true", default=None,
                   help="cargar la base en 4 bits (nf4) (por defecto: sí con GPU, para caber en una T4; no en CPU)")
    p.add_argument("--no-load-in-4bit", dest="load_in_4bit", action="store_false",
                   help="cargar la base en 16 bits en GPU (más rápido y más memoria)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="precisión de cálculo (por defecto: auto = bf16 en GPU que lo tenga, fp16 en la T4; en CPU, "
                        "bf16 si el procesador lo calcula de forma nativa (AMX), que entrena más rápido "
                        "(BENCHMARKS.md), y fp32 si no; los pesos de LoRA y el optimizador siempre en fp32)")
    p.add_argument("--lora-r", type=int, default=settings.common_default("lora_r"),
                   help=settings.help_text("lora_r", "rango de LoRA"))
    p.add_argument("--lora-alpha", type=int, default=None, help=settings.help_text("lora_alpha", "alpha de LoRA"))
    p.add_argument("--lora-layers", type=int, default=None,
                   help=settings.help_text("lora_layers", "capas (las de arriba) que reciben LoRA"))
    p.add_argument("--lora-dropout", type=float, default=settings.common_default("lora_dropout"),
                   help=settings.help_text("lora_dropout", "dropout de LoRA"))
    p.add_argument("--max-seq-length", type=int, default=None,
                   help=settings.help_text("max_seq_length", "longitud máxima en tokens"))
    p.add_argument("--seed", type=int, default=None, help=settings.help_text("seed", "semilla"))
    p.add_argument("--questions", default="preguntas_contraste.json",
                   help="preguntas de contraste (por defecto: preguntas_contraste.json)")
    p.add_argument("--probe-file", default=None,
                   help="pares (verdadera, error típico) de la sonda de errores que la etapa 04 mide antes y después; "
                        "nunca se entrenan (por defecto: sondas_errores.json del proyecto; «none» la desactiva)")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens máximos por respuesta (por defecto: 200, de sobra para un párrafo; el corte delata "
                        "a un modelo que no sabe parar)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalización de repetición de la generación, la misma antes (02) y después (04) "
                        "(por defecto: 1.15; sin ella el modelo de 135M repite frases en bucle, con ella a veces "
                        "inventa palabras: BENCHMARKS.md)")
    p.add_argument("--gen-batch-size", type=int, default=16,
                   help="preguntas generadas a la vez, con relleno a la izquierda (por defecto: 16; las 10 de "
                        "contraste en un solo lote)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", default=None,
                        help="instrucciones de sistema de cada conversación: el tema y el tono del asistente. Las "
                             "heredan el entrenamiento (03), el contraste (04), el Modelfile de Ollama y la ficha del "
                             "modelo (por defecto: el asistente académico de ciencias de la vida, en español)")
    prompt.add_argument("--system-prompt-file", default=None,
                        help="lo mismo, leído de un archivo de texto UTF-8 (para instrucciones de varias líneas)")
    p.add_argument("--overwrite", action="store_true",
                   help="borrar un directorio de salida que ya tiene contenido (por defecto: no, se protege)")
    return p.parse_args(cli.argv_or_notebook(argv))


@main_guard
def main(argv=None):
    args = parse_args(argv)
    from afinar.stages import stage_load  # after parsing: --help and a bad flag answer without loading the pipeline

    result = stage_load.run(args)
    layout = result["layout"]
    print(f"\nListo. Manifiesto: {layout.manifest}\nRespuestas 'antes': {layout.answers_before}\n"
          f"Siguiente paso: python 03_train_model.py --output-dir {cli.quoted(layout.root)}")


if __name__ == "__main__":
    main()
