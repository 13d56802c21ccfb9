"""Etapa 03: revisa los datos y entrena el adaptador LoRA con SFT (TRL).

Uso:
    python 03_train_model.py                                   # tu_dataset.json, ajustes heredados de run.json
    python 03_train_model.py --check-data --dataset mis_datos.json   # solo revisa los datos, sin modelo
    python 03_train_model.py --max-steps 30 --learning-rate 5e-4
    python 03_train_model.py --resume                          # continúa tras una desconexión

Escribe checkpoints/, adapter/, metrics.jsonl, loss.png y datos/informe.md en el directorio de salida.
"""

import argparse

from afinar.core import cli, settings
from afinar.core.errors import main_guard


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--dataset", default="tu_dataset.json",
                   help="datos en formato Alpaca, ShareGPT («conversations») o de chat («messages»), de uno o varios "
                        "turnos, en JSON o JSON Lines (por defecto: tu_dataset.json)")
    p.add_argument("--check-data", action="store_true",
                   help="solo revisar los datos y terminar, sin cargar ningún modelo (por defecto: no)")
    p.add_argument("--max-steps", type=int, default=None, help=settings.help_text("max_steps", "pasos de entrenamiento"))
    p.add_argument("--epochs", type=float, default=None, help=settings.help_text("epochs", "épocas"))
    p.add_argument("--learning-rate", type=float, default=None,
                   help=settings.help_text("learning_rate", "tasa de aprendizaje"))
    p.add_argument("--loraplus-lr-ratio", type=float, default=None,
                   help=settings.help_text("loraplus_lr_ratio", "tasa de lora_B sobre la de lora_A"))
    p.add_argument("--batch-size", type=int, default=None, help=settings.help_text("batch_size", "tamaño de lote"))
    p.add_argument("--grad-accum", type=int, default=None,
                   help=settings.help_text("grad_accum", "pasos de acumulación de gradiente"))
    p.add_argument("--max-seq-length", type=int, default=None,
                   help=settings.help_text("max_seq_length", "longitud máxima en tokens"))
    p.add_argument("--seed", type=int, default=None, help=settings.help_text("seed", "semilla"))
    p.add_argument("--save-steps", type=int, default=None, help=settings.help_text("save_steps", "checkpoint cada N pasos"))
    p.add_argument("--save-minutes", type=float, default=None,
                   help=settings.help_text("save_minutes", "checkpoint cada N minutos"))
    p.add_argument("--logging-steps", type=int, default=None,
                   help=settings.help_text("logging_steps", "pasos entre líneas de registro"))
    p.add_argument("--eval-steps", type=int, default=None,
                   help=settings.help_text("eval_steps", "pérdida de evaluación cada N pasos"))
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help=settings.help_text("packing", "empaquetar varios ejemplos seguidos en cada fila, sin mezclar "
                                                      "su atención"))
    p.add_argument("--engine", choices=["auto", "unsloth", "compiled", "eager"], default=None,
                   help=settings.help_text("engine", "motor de entrenamiento"))
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help=settings.help_text("fp8", "multiplicar la base congelada en FP8 (e4m3)"))
    pref = p.add_argument_group("preferencias (DPO tras el SFT u ORPO dentro de él, con las entradas que traen "
                                "'rejected')")
    pref.add_argument("--preference", choices=["auto", "dpo", "orpo", "none"], default=None,
                      help=settings.help_text("preference", "entrenamiento de preferencias"))
    pref.add_argument("--dpo-beta", type=float, default=None, help=settings.help_text("dpo_beta", "beta de DPO"))
    pref.add_argument("--orpo-beta", type=float, default=None, help=settings.help_text("orpo_beta", "beta de ORPO"))
    pref.add_argument("--preference-epochs", type=float, default=None,
                      help=settings.help_text("preference_epochs", "épocas de preferencias"))
    pref.add_argument("--preference-learning-rate", type=float, default=None,
                      help=settings.help_text("preference_learning_rate", "tasa de aprendizaje de preferencias"))
    p.add_argument("--resume", action="store_true", help="reanudar desde el último checkpoint (por defecto: no)")
    p.add_argument("--overwrite", action="store_true",
                   help="entrenar de nuevo aunque ya exista un adaptador (por defecto: no, para no perder el que hay)")
    data = p.add_argument_group("datos")
    data.add_argument("--hub-dataset", action="append", metavar="NOMBRE[:N]",
                      help="mezclar un conjunto Alpaca en español del Hub o una copia local (repetible); "
                           "p. ej. bertin-project/alpaca-spanish:2000 (por defecto: ninguno, solo tus datos)")
    data.add_argument("--hub-ratio", type=float, default=0.3,
                      help="proporción de ejemplos del Hub en la mezcla (por defecto: 0.3; más diluye tu tema)")
    data.add_argument("--keep-duplicates", action="store_true",
                      help="conservar duplicados y casi duplicados (por defecto: se eliminan para no saturar el modelo)")
    data.add_argument("--drop-non-spanish", action="store_true",
                      help="eliminar entradas que no están en español (por defecto: solo se avisan)")
    data.add_argument("--mix-ratio", type=float, default=None,
                      help="proporción de ensayos largos en cada ventana (por defecto: la de los datos)")
    data.add_argument("--eval-fraction", type=float, default=0.1,
                      help="parte de tus datos apartada para medir la perplejidad (por defecto: 0.1)")
    return p.parse_args(cli.argv_or_notebook(argv))


@main_guard
def main(argv=None):
    args = parse_args(argv)
    from afinar.stages import stage_train  # after parsing: --help and a bad flag answer without loading the pipeline

    if args.check_data:
        print(stage_train.check_only(args.dataset))
        return
    result = stage_train.run(args)
    layout = result["layout"]
    plot = f"Curva de pérdida: {layout.loss_plot}\n" if layout.loss_plot.exists() else ""
    print(f"\nListo. Adaptador: {layout.adapter}\nMétricas: {layout.metrics}\n{plot}"
          f"Siguiente paso: python 04_inference_and_export.py --output-dir {cli.quoted(layout.root)}")


if __name__ == "__main__":
    main()
