"""Etapa 04: prueba de contraste (antes/después), fusión a 16 bits, GGUF, ficha del modelo y subida al Hub.

Uso:
    python 04_inference_and_export.py                     # contraste + merged_16bit/ + gguf/ + fichas
    python 04_inference_and_export.py --chat              # conversar con el modelo afinado (línea vacía: salir)
    python 04_inference_and_export.py --push --repo-id usuario/mi-modelo [--private] [--what adapter,merged,gguf]
    python 04_inference_and_export.py --push-only --repo-id usuario/mi-modelo   # reintentar solo la subida

El token del Hub se lee de HF_TOKEN o de los secretos de Colab; nunca se imprime ni se guarda.
"""

from afinar.core import cli, settings
from afinar.core.errors import main_guard


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--questions", default="preguntas_contraste.json",
                   help="preguntas de contraste si run.json no registra otras (por defecto: preguntas_contraste.json)")
    p.add_argument("--eval-file", default=None,
                   help="entradas Alpaca para medir la perplejidad (por defecto: las apartadas por la etapa 03)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens máximos por respuesta en --chat (por defecto: 300); la prueba de contraste usa "
                        "siempre los de la etapa 02 para comparar en igualdad de condiciones")
    p.add_argument("--chat", action="store_true",
                   help="abrir un chat interactivo con el modelo afinado y terminar (por defecto: no)")
    p.add_argument("--no-merge", action="store_true",
                   help="no fusionar ni exportar, solo la prueba de contraste (por defecto: no)")
    p.add_argument("--merge-dtype", choices=["float16", "bfloat16"], default=settings.common_default("merge_dtype"),
                   help=settings.help_text("merge_dtype", "precisión de merged_16bit/"))
    p.add_argument("--gguf", default="q8_0",
                   help="formatos GGUF separados por comas: f16, q8_0, q5_k_m, q5_0, q4_k_m, q4_0 o none (por "
                        "defecto: q8_0, la mitad de tamaño que f16 y casi sin pérdida; q4_k_m es el tipo habitual "
                        "en Ollama, más pequeño y con algo más de pérdida; listo para Ollama)")
    p.add_argument("--push", action="store_true",
                   help="subir al Hub al terminar, con --repo-id y HF_TOKEN (por defecto: no, todo queda en local)")
    p.add_argument("--push-only", action="store_true",
                   help="subir lo ya exportado sin recalcular nada (por defecto: no)")
    p.add_argument("--repo-id", default=None,
                   help="repositorio de destino en el Hub: usuario/nombre (por defecto: ninguno; necesario con --push)")
    p.add_argument("--private", action="store_true", help="crear el repositorio como privado (por defecto: público)")
    p.add_argument("--what", default="adapter,merged,gguf",
                   help="qué subir: adapter, merged, gguf (por defecto: las tres)")
    p.add_argument("--overwrite", action="store_true",
                   help="repetir la exportación aunque ya exista (por defecto: no, para no pisar lo exportado)")
    return p.parse_args(cli.argv_or_notebook(argv))


@main_guard
def main(argv=None):
    args = parse_args(argv)
    from afinar.stages import stage_export  # after parsing: --help and a bad flag answer without loading the pipeline

    result = stage_export.run(args)
    layout = result["layout"]
    if "contrast" in result:
        verdict = result["contrast"]["verdict"]
        print(f"\nVeredicto: {'LISTO' if verdict['ready'] else 'TODAVÍA NO'}")
        for reason in verdict["reasons"]:
            print(f"  - {reason}")
        print(f"\nInforme: {layout.contrast_md} y {layout.contrast_html}")
        if layout.merged.exists():
            print(f"Modelo fusionado: {layout.merged}")
        if layout.gguf_dir.exists():
            print(f"GGUF y Modelfile de Ollama: {layout.gguf_dir}")
    if "push" in result:
        print(f"Subido a: {result['push'].get('url', '')}")


if __name__ == "__main__":
    main()
