"""Command line of 00_destilar.py: flags, input checks and building the teacher; afinar.data.distill does the rest."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from afinar.core import cli, validation
from afinar.core.errors import UserError
from afinar.data import distill, teacher
from afinar.data.data_check import read_dataset
from afinar.evaluate import probe

DEFAULT_OUTPUT = "datos_destilados.json"


def parse_args(argv=None, description: str | None = None):
    p = cli.SpanishArgumentParser(description=description or "Destilación: datos Alpaca de un modelo profesor.",
                                  formatter_class=cli.SpanishHelpFormatter, add_help=False)
    p._optionals.title = "opciones"
    p.add_argument("-h", "--help", action="help", help="muestra esta ayuda y termina")
    p.add_argument("--topics", required=True, help="archivo de texto con un tema por línea (obligatorio)")
    t = p.add_argument_group("profesor")
    t.add_argument("--teacher-url", default=None,
                   help="URL base de un servidor compatible con OpenAI, p. ej. http://localhost:11434/v1 (Ollama) o "
                        "https://generativelanguage.googleapis.com/v1beta/openai (Gemini). Sin ella, "
                        "--teacher-model es una carpeta local de transformers o smollm2-135m")
    t.add_argument("--teacher-model", required=True,
                   help="nombre del modelo en el servidor, o carpeta local / smollm2-135m sin --teacher-url "
                        "(obligatorio)")
    t.add_argument("--api-key-env", default=None, metavar="VARIABLE",
                   help="variable de entorno (o secreto de Colab) con la clave; por defecto se busca en "
                        + ", ".join(teacher.KEY_NAMES) + ". La clave nunca se muestra ni se guarda")
    t.add_argument("--concurrency", type=int, default=4, help="peticiones simultáneas al servidor (por defecto: 4)")
    t.add_argument("--timeout", type=float, default=teacher.DEFAULT_TIMEOUT_S,
                   help="segundos de espera por respuesta antes de reintentar "
                        f"(por defecto: {teacher.DEFAULT_TIMEOUT_S:g})")
    t.add_argument("--max-retries", type=int, default=teacher.DEFAULT_MAX_RETRIES,
                   help="reintentos por petición ante 429, errores 5xx, tiempos agotados y cortes de conexión, con "
                        f"espera exponencial o la que pida Retry-After (por defecto: {teacher.DEFAULT_MAX_RETRIES})")
    t.add_argument("--json-retries", type=int, default=distill.DEFAULT_JSON_RETRIES,
                   help="veces que se vuelve a pedir una respuesta cuyo JSON no se puede reparar "
                        f"(por defecto: {distill.DEFAULT_JSON_RETRIES})")
    t.add_argument("--temperature", type=float, default=0.7, help="temperatura del profesor (por defecto: 0.7)")
    t.add_argument("--max-tokens", type=int, default=None,
                   help="tope de tokens por respuesta para todos los tipos (por defecto: "
                        + ", ".join(f"{distill.KIND_NAMES[k]} {v}" for k, v in distill.DEFAULT_MAX_TOKENS.items())
                        + ")")
    t.add_argument("--batch-size", type=int, default=8,
                   help="respuestas generadas a la vez con un modelo local (por defecto: 8)")
    t.add_argument("--seed", type=int, default=0, help="semilla del muestreo de un modelo local (por defecto: 0)")
    m = p.add_argument_group("mezcla por tema")
    m.add_argument("--essays-per-topic", type=int, default=2, help="ensayos de ≥ 150 palabras (por defecto: 2)")
    m.add_argument("--answers-per-topic", type=int, default=6, help="respuestas de ≤ 40 palabras (por defecto: 6)")
    m.add_argument("--misconceptions-per-topic", type=int, default=2,
                   help="preguntas de errores típicos, con respuesta correcta y equivocada (por defecto: 2)")
    m.add_argument("--base-model", default=None,
                   help="conservar solo los errores típicos en los que este modelo base falla (prefiere la respuesta "
                        "equivocada); p. ej. smollm2-135m o una carpeta local (por defecto: no se filtra)")
    o = p.add_argument_group("salida")
    o.add_argument("--output", default=DEFAULT_OUTPUT, help=f"archivo Alpaca de salida (por defecto: {DEFAULT_OUTPUT})")
    o.add_argument("--cache", default=None,
                   help="caché JSONL de peticiones y respuestas (por defecto: <salida>.cache.jsonl)")
    o.add_argument("--against", default=None,
                   help="conjunto existente (p. ej. tu_dataset.json): se descartan las entradas que lo repiten")
    o.add_argument("--merge", action="store_true",
                   help="escribir en la salida las entradas de --against seguidas de las nuevas (por defecto: solo "
                        "las nuevas)")
    o.add_argument("--price-per-mtok", default=None, metavar="ENTRADA[,SALIDA]",
                   help="precio por millón de tokens para estimar el coste, p. ej. 0.30,2.50 (por defecto: sin "
                        "estimación)")
    o.add_argument("--currency", default="US$", help="moneda del precio (por defecto: US$)")
    return p.parse_args(cli.argv_or_notebook(argv))


def _check_number(flag: str, value, low, high=None) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low
            and (high is None or value <= high)):
        bound = f"entre {low} y {high}" if high is not None else f"al menos {low}"
        raise UserError(f"{flag} debe ser {bound} (se pidió {value}).")


def settings_from(args) -> distill.Settings:
    counts = distill.check_counts(args.essays_per_topic, args.answers_per_topic, args.misconceptions_per_topic)
    _check_number("--concurrency", args.concurrency, 1, 256)
    _check_number("--timeout", args.timeout, 0.1, 3600)
    _check_number("--max-retries", args.max_retries, 0, 100)
    _check_number("--json-retries", args.json_retries, 0, 20)
    _check_number("--temperature", args.temperature, 0, 2)
    _check_number("--batch-size", args.batch_size, 1, 4096)
    _check_number("--seed", args.seed, 0, 2**32 - 1)
    if args.max_tokens is not None:
        _check_number("--max-tokens", args.max_tokens, 1, 32768)
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"«{output}» (--output) es una carpeta; se esperaba un nombre de archivo .json.")
    against = Path(args.against) if args.against else None
    if against is not None and not against.is_file():
        raise UserError(f"No existe el conjunto «{against}» (--against).")
    if args.merge and against is None:
        raise UserError("--merge necesita --against: es el conjunto que se copia delante de las entradas nuevas.")
    if against is not None and not args.merge and output.resolve() == against.resolve():
        raise UserError(f"--output «{output}» es el mismo archivo que --against: se perderían sus entradas. Usa "
                        f"otro --output o añade --merge.")
    topics = distill.read_topics(args.topics)
    cache_path = Path(args.cache) if args.cache else distill.default_cache_path(output)
    if cache_path.is_dir():
        raise UserError(f"«{cache_path}» (--cache) es una carpeta; se esperaba un archivo .jsonl.")
    # Before the first paid request: an answer that cannot be cached or written is money thrown away.
    validation.require_writable(output.parent, "--output")
    validation.require_writable(cache_path.parent, "--cache")
    # Read now, not after the teacher (a local model) is loaded: a broken --against fails in a second.
    against_entries = read_dataset(against).entries if against is not None else None
    max_tokens = dict(distill.DEFAULT_MAX_TOKENS)
    if args.max_tokens is not None:
        max_tokens = {kind: args.max_tokens for kind in max_tokens}
    return distill.Settings(
        topics=topics, counts=counts, output=output,
        cache_path=cache_path, against=against, against_entries=against_entries, merge=args.merge,
        concurrency=args.concurrency, json_retries=args.json_retries,
        max_tokens=max_tokens, temperature=args.temperature, price=distill.parse_price(args.price_per_mtok),
        currency=args.currency,
    )


def build_teacher(args):
    if args.teacher_url:
        base_url = teacher.check_base_url(args.teacher_url)
        names = (args.api_key_env,) if args.api_key_env else teacher.KEY_NAMES
        key, where = teacher.find_api_key(names)
        if key is None and args.api_key_env:
            raise UserError(f"No hay ninguna clave en la variable de entorno ni en el secreto de Colab "
                            f"«{args.api_key_env}» (--api-key-env).")
        print(f"Profesor: {base_url}, modelo «{args.teacher_model}», clave: "
              f"{'de la ' + where if where else 'ninguna (un servidor local no la necesita)'}.", flush=True)
        return teacher.HttpTeacher(base_url, args.teacher_model, key, timeout=args.timeout,
                                   max_retries=args.max_retries)
    print(f"Profesor local: «{args.teacher_model}» (sin red).", flush=True)
    return teacher.LocalTeacher(args.teacher_model, batch_size=args.batch_size, seed=args.seed)


def base_scorer(name: str):
    """score_pairs of afinar.evaluate.probe on the base model, loaded only when there are misconceptions to score."""
    def score(pairs):
        local = teacher.LocalTeacher(name)
        print(f"Modelo base «{name}»: comprobando si falla los {len(pairs)} errores típicos ...", flush=True)
        return probe.score_pairs(local.model, local.tokenizer, pairs)
    return score


def main(argv=None, description: str | None = None) -> None:
    args = parse_args(argv, description)
    settings = settings_from(args)
    if args.base_model and settings.counts.misconception == 0:
        raise UserError("--base-model solo filtra errores típicos, y --misconceptions-per-topic es 0.")
    the_teacher = build_teacher(args)
    distiller = distill.Distiller(the_teacher, settings,
                                  base_scorer=base_scorer(args.base_model) if args.base_model else None)
    summary = distiller.run()
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["rejected_by_reason"].items())) or "ninguna"
    print(f"\nConservadas {summary['kept']} de {summary['planned']} entradas; descartadas {summary['rejected']} "
          f"({reasons}). Informe: {summary['report']}", flush=True)
    if not summary["kept"]:
        print("Ninguna entrada pasó la revisión; no se escribió el archivo de salida. Revisa el informe.",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    print(f"Datos: {summary['output']} ({summary['entries_written']} entradas).\n"
          f"Siguiente paso: python 02_load_model.py (si aún no lo hiciste) y después "
          f"python 03_train_model.py --dataset {cli.quoted(summary['output'])}", flush=True)
