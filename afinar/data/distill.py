"""Distillation: a teacher model writes Alpaca entries per topic, and only the ones that pass our checks are kept.

Per topic the plan asks for three kinds of entry:
- "essay": a long answer (>= data_mix.LONG_MIN_WORDS words), the "ensayos" of the course method;
- "short": a precise answer of at most SHORT_MAX_WORDS words;
- "misconception": an "errores típicos" question with the correct answer (`output`) and the wrong answer a
  student would give (`rejected`), which preference training uses. With a base model given, only the
  questions the base model gets wrong (it prefers `rejected`, by log-probability) are kept.

Every answer goes through the same checks as a hand-written dataset (data_check), the length class of its
kind, the language check and the duplicate screening of data_clean (also against an existing dataset).

Requests run in rounds: round 0 asks every item once; an item whose answer is not usable JSON (after the
repairs in `parse_answer`) is asked again in the next round with a reminder, up to `json_retries` times. Every
request and its answer is appended to a JSONL cache keyed by a hash of (teacher, request), so a rerun after an
interruption sends only what is missing and the output is the same whatever the order answers arrived in.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from afinar.core import atomic
from afinar.core.errors import UserError
from afinar.data.data_check import plural, read_dataset, validate_records
from afinar.data.data_mix import LONG_MIN_WORDS, word_count
from afinar.data.teacher import Reply, TeacherUnavailable

KINDS = ("essay", "short", "misconception")
KIND_NAMES = {"essay": "ensayo", "short": "respuesta corta", "misconception": "error típico"}
SHORT_MAX_WORDS = 40
MAX_PER_TOPIC = 1000
MAX_TOPIC_CHARS = 300
DEFAULT_MAX_TOKENS = {"essay": 900, "short": 200, "misconception": 450}
DEFAULT_JSON_RETRIES = 2

SYSTEM_PROMPT = (
    "Eres un profesor de biología que escribe material didáctico en español, riguroso y claro. "
    "Respondes únicamente con un objeto JSON válido, sin texto antes ni después y sin bloques de código."
)

_ESSAY = (
    "Tema: {topic}\n\n"
    "Escribe un ensayo divulgativo en español de entre 180 y 260 palabras sobre un aspecto concreto de este "
    "tema (variante {n} de {total}: elige un aspecto distinto en cada variante). Usa párrafos, sin listas ni "
    "títulos. Devuelve solo este JSON:\n"
    '{{"pregunta": "la petición o pregunta a la que responde el ensayo", "respuesta": "el ensayo"}}'
)
_SHORT = (
    "Tema: {topic}\n\n"
    "Escribe en español una pregunta concreta sobre este tema y su respuesta precisa, de como mucho 35 "
    "palabras (variante {n} de {total}: pregunta por algo distinto en cada variante). Devuelve solo este JSON:\n"
    '{{"pregunta": "la pregunta", "respuesta": "la respuesta breve"}}'
)
_MISCONCEPTION = (
    "Tema: {topic}\n\n"
    "Piensa en un error típico de los estudiantes sobre este tema (variante {n} de {total}: un error distinto "
    "en cada variante). Escribe en español una pregunta que invite a caer en ese error, la respuesta correcta "
    "(como mucho 80 palabras, que deshaga el error) y la respuesta equivocada que daría quien tiene ese error "
    "(misma extensión y tono, pero falsa). Devuelve solo este JSON:\n"
    '{{"pregunta": "la pregunta", "respuesta_correcta": "la respuesta correcta", '
    '"respuesta_erronea": "la respuesta equivocada"}}'
)
_TEMPLATES = {"essay": _ESSAY, "short": _SHORT, "misconception": _MISCONCEPTION}
_REMINDER = ("\n\n(Intento {attempt}: la respuesta anterior no era un JSON válido con esos campos. Responde solo "
             "con el objeto JSON.)")

# Key spellings teachers actually use for the same field, lower-cased.
_QUESTION_KEYS = ("pregunta", "instruction", "question", "instruccion", "instrucción", "prompt")
_ANSWER_KEYS = ("respuesta", "respuesta_correcta", "output", "answer", "correct_answer", "ensayo", "essay")
_WRONG_KEYS = ("respuesta_erronea", "respuesta_errónea", "respuesta_incorrecta", "rejected", "wrong_answer",
               "incorrect_answer", "error")


# --------------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Counts:
    essay: int
    short: int
    misconception: int

    def of(self, kind: str) -> int:
        return getattr(self, kind)

    def per_topic(self) -> int:
        return self.essay + self.short + self.misconception


def check_counts(essay: int, short: int, misconception: int) -> Counts:
    for flag, value in (("--essays-per-topic", essay), ("--answers-per-topic", short),
                        ("--misconceptions-per-topic", misconception)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PER_TOPIC:
            raise UserError(f"{flag} debe ser un número entero entre 0 y {MAX_PER_TOPIC} (se pidió {value}).")
    if essay + short + misconception == 0:
        raise UserError("--essays-per-topic, --answers-per-topic y --misconceptions-per-topic son 0: no hay nada "
                        "que generar; pide al menos una entrada por tema.")
    return Counts(essay, short, misconception)


def read_topics(path: str | os.PathLike) -> list[str]:
    """One topic a line; blank lines and lines starting with # are skipped, repeated topics kept once."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"No existe el archivo de temas «{path}» (--topics): crea un archivo de texto con un tema "
                        f"por línea.")
    if path.is_dir():
        raise UserError(f"«{path}» (--topics) es una carpeta; se esperaba un archivo de texto con un tema por "
                        f"línea.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"«{path}» (--topics), byte {err.start}: no es texto UTF-8; guárdalo con codificación "
                        f"UTF-8.") from None
    except OSError as err:
        raise UserError(f"No se puede leer «{path}» (--topics): {err.strerror}.") from None
    topics: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        topic = " ".join(line.split())
        if not topic or topic.startswith("#"):
            continue
        if len(topic) > MAX_TOPIC_CHARS:
            raise UserError(f"«{path}» (--topics), línea {number}: el tema tiene {len(topic)} caracteres; el "
                            f"máximo "
                            f"es {MAX_TOPIC_CHARS} (¿falta un salto de línea?).")
        if topic.casefold() not in seen:
            seen.add(topic.casefold())
            topics.append(topic)
    if not topics:
        raise UserError(f"El archivo de temas «{path}» (--topics) está vacío: escribe un tema por línea "
                        f"(las líneas que empiezan por # se ignoran).")
    return topics


def parse_price(text: str | None) -> tuple[float, float] | None:
    """'0.10' (same price in and out) or '0.10,0.40' (input, output), in currency units per million tokens."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(not (v >= 0 and v < 1e6) for v in values):
        raise UserError(f"--price-per-mtok «{text}» no es válido: escribe el precio por millón de tokens, uno "
                        f"(p. ej. 0.30) o entrada y salida separados por coma (p. ej. 0.10,0.40).")
    return (values[0], values[-1])


# --------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Item:
    number: int  # 1-based position in the plan: the report's "n.º"
    topic: str
    kind: str
    variant: int  # 1-based within (topic, kind)
    total: int


def plan_items(topics: Sequence[str], counts: Counts) -> list[Item]:
    items = []
    for topic in topics:
        for kind in KINDS:
            total = counts.of(kind)
            for variant in range(1, total + 1):
                items.append(Item(len(items) + 1, topic, kind, variant, total))
    return items


def request_body(item: Item, attempt: int, max_tokens: dict[str, int], temperature: float) -> dict[str, Any]:
    user = _TEMPLATES[item.kind].format(topic=item.topic, n=item.variant, total=item.total)
    if attempt:
        user += _REMINDER.format(attempt=attempt + 1)
    return {
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
        "max_tokens": int(max_tokens[item.kind]),
        "temperature": float(temperature),
    }


def cache_key(identity: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"teacher": identity, "body": body}, ensure_ascii=False, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------- cache


class Cache:
    """Append-only JSONL of {key, teacher, item, request, reply}.

    Append, not atomic rewrite: each answer must be on disk the moment it arrives (a kill loses at most the
    line being written), and rewriting the whole file per answer would be quadratic. A torn last line from a
    kill is skipped on reading and counted.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.damaged_lines = 0
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise UserError(f"«{self.path}» (--cache) es una carpeta; se esperaba un archivo .jsonl.")
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise UserError(f"No se puede leer la caché «{self.path}» (--cache): {err.strerror}.") from None
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                reply = row["reply"]
                self.entries[str(row["key"])] = {
                    "text": str(reply["text"]), "prompt_tokens": int(reply["prompt_tokens"]),
                    "completion_tokens": int(reply["completion_tokens"]),
                    "tokens_estimated": bool(reply.get("tokens_estimated", False))}
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                self.damaged_lines += 1

    def get(self, key: str) -> Reply | None:
        found = self.entries.get(key)
        return Reply(**found) if found else None

    def put(self, key: str, identity: str, item: Item, body: dict[str, Any], reply: Reply) -> None:
        row = {"key": key, "teacher": identity, "topic": item.topic, "kind": item.kind, "variant": item.variant,
               "request": body,
               "reply": {"text": reply.text, "prompt_tokens": reply.prompt_tokens,
                         "completion_tokens": reply.completion_tokens, "tokens_estimated": reply.tokens_estimated},
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                # A torn line left by an earlier kill would glue onto this one; start on a fresh line.
                if handle.tell() and not self._ends_with_newline():
                    handle.write(b"\n")
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[key] = {"text": reply.text, "prompt_tokens": reply.prompt_tokens,
                                 "completion_tokens": reply.completion_tokens,
                                 "tokens_estimated": reply.tokens_estimated}

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"


# --------------------------------------------------------------------------------------------------- parsing


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_LENIENT = json.JSONDecoder(strict=False)  # raw newlines inside strings: the commonest teacher slip


def _loads(text: str) -> Any:
    return _LENIENT.decode(text)


def parse_answer(text: str) -> tuple[dict[str, Any] | None, bool]:
    """(object, repaired) from a teacher's answer; (None, False) when no repair gives a JSON object.

    Repairs, in order: code fences, prose around the object, trailing commas, an answer cut before its final
    quote or brace (max_tokens reached). Each is what real models do; anything beyond is asked again.
    """
    text = _THINK.sub("", text or "").strip()  # reasoning models (DeepSeek-R1, Qwen3) think aloud first
    if not text:
        return None, False
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value, False
    except ValueError:
        pass
    candidate = _FENCE.sub("", text).strip()
    start = candidate.find("{")
    if start < 0:
        return None, False
    end = candidate.rfind("}")
    body = candidate[start:end + 1] if end > start else candidate[start:]
    attempts = [body, _TRAILING_COMMA.sub(r"\1", body)]
    tail = _TRAILING_COMMA.sub(r"\1", candidate[start:]).rstrip().rstrip(",")
    attempts += [tail + '"}', tail + "}", tail + '"]}']
    for attempt in attempts:
        try:
            value = _loads(attempt)
        except ValueError:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and value:  # "... {" closed into {} is no answer
            return value, True
    return None, False


def _field(obj: dict[str, Any], names: Sequence[str]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for name in names:
        value = lowered.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def to_entry(obj: dict[str, Any], kind: str) -> dict[str, str] | None:
    """The Alpaca entry an answer object describes, or None if a field the kind needs is missing."""
    question = _field(obj, _QUESTION_KEYS)
    answer = _field(obj, _ANSWER_KEYS)
    if question is None or answer is None:
        return None
    entry = {"instruction": question, "input": "", "output": answer}
    if kind == "misconception":
        wrong = _field(obj, _WRONG_KEYS)
        if wrong is None:
            return None
        entry["rejected"] = wrong
    return entry


# --------------------------------------------------------------------------------------------------- run


@dataclass
class Settings:
    topics: list[str]
    counts: Counts
    cache_path: Path
    output: Path
    against: Path | None = None
    against_entries: list[dict[str, str]] | None = None  # already read from `against`, else read by run()
    merge: bool = False
    concurrency: int = 4
    json_retries: int = DEFAULT_JSON_RETRIES
    max_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_TOKENS))
    temperature: float = 0.7
    price: tuple[float, float] | None = None
    currency: str = "US$"
    report: Path | None = None


@dataclass
class Outcome:
    item: Item
    entry: dict[str, str] | None = None
    status: str = "pending"  # kept | rejected
    reason: str = ""
    category: str = ""
    attempts: int = 0
    repaired: bool = False
    from_cache: int = 0


@dataclass
class Totals:
    sent: int = 0  # answers obtained from the teacher in this run
    cached: int = 0  # answers reused from the cache
    prompt_tokens: int = 0  # paid in this run
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    tokens_estimated: bool = False
    json_clean: int = 0
    json_repaired: int = 0
    json_retried: int = 0  # re-asked because the answer was unusable
    json_failed: int = 0  # still unusable after every retry
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cost(self, price: tuple[float, float] | None, cached: bool = False) -> float | None:
        if price is None:
            return None
        p, c = ((self.cached_prompt_tokens, self.cached_completion_tokens) if cached
                else (self.prompt_tokens, self.completion_tokens))
        return (p * price[0] + c * price[1]) / 1_000_000


def _thousands(value: int) -> str:
    return f"{value:,}".replace(",", ".")


def _money(value: float, currency: str) -> str:
    return f"{value:.4f}".replace(".", ",") + f" {currency}"


class Progress:
    """One line with answers, tokens and cost; redrawn in place on a terminal, throttled to a line a second
    elsewhere (a notebook or a log file)."""

    def __init__(self, total: int, totals: Totals, counters, settings: Settings, stream=None) -> None:
        self.total = total
        self.totals = totals
        self.counters = counters
        self.settings = settings
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._last = 0.0
        self._last_line = ""
        self._lock = threading.Lock()
        self.began = time.perf_counter()

    def step(self, final: bool = False) -> None:
        with self._lock:
            if not final:
                self.done += 1
            now = time.perf_counter()
            if not final and now - self._last < (0.2 if self.tty else 1.0) and self.done < self.total:
                return
            self._last = now
            t = self.totals
            retries = sum(self.counters.retries.values())
            line = (f"destilación: {self.done}/{self.total} respuestas ({t.cached} de la caché), "
                    f"tokens {_thousands(t.prompt_tokens)} entrada + {_thousands(t.completion_tokens)} salida"
                    f"{' (estimados)' if t.tokens_estimated else ''}, reintentos {retries}, "
                    f"{now - self.began:.0f} s")
            cost = t.cost(self.settings.price)
            if cost is not None:
                line += f", coste ~{_money(cost, self.settings.currency)}"
            if final and line == self._last_line and not self.tty:
                return
            self._last_line = line
            end = "\n" if final or not self.tty else ""
            print(("\r" if self.tty else "") + line + end, end="", file=self.stream, flush=True)


class Distiller:
    def __init__(self, teacher, settings: Settings, *, base_scorer: Callable | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.teacher = teacher
        self.settings = settings
        self.cache = Cache(settings.cache_path)
        self.totals = Totals()
        self.base_scorer = base_scorer
        self.log = log or (lambda message: print(message, flush=True))

    # ---------------------------------------------------------------- asking

    def _ask_round(self, pending: list[tuple[Outcome, int]], progress: Progress) -> list[tuple[Outcome, Reply]]:
        """Answers for (outcome, attempt) pairs: from the cache, else from the teacher; in plan order."""
        identity = self.teacher.identity()
        jobs = []
        answers: dict[int, Reply] = {}
        for index, (outcome, attempt) in enumerate(pending):
            body = request_body(outcome.item, attempt, self.settings.max_tokens, self.settings.temperature)
            key = cache_key(identity, body)
            cached = self.cache.get(key)
            if cached is not None:
                answers[index] = cached
                outcome.from_cache += 1
                with self.totals.lock:
                    self.totals.cached += 1
                    self.totals.cached_prompt_tokens += cached.prompt_tokens
                    self.totals.cached_completion_tokens += cached.completion_tokens
                progress.step()
            else:
                jobs.append((index, outcome, body, key))

        def fetch(index: int, outcome: Outcome, body: dict, key: str) -> Reply:
            # Cached in the worker, the moment the answer arrives: an answer still in flight when the user
            # presses Ctrl+C is paid for, so it must be on disk for the next run too.
            reply = self.teacher.complete(body)
            self.cache.put(key, identity, outcome.item, body, reply)
            return reply

        def record(index: int, outcome: Outcome, body: dict, key: str, reply: Reply) -> None:
            answers[index] = reply
            with self.totals.lock:
                self.totals.sent += 1
                self.totals.prompt_tokens += reply.prompt_tokens
                self.totals.completion_tokens += reply.completion_tokens
                self.totals.tokens_estimated |= reply.tokens_estimated
            progress.step()

        if jobs and hasattr(self.teacher, "complete_batch"):
            # Local model: one batched generate per max_tokens group (the plan has at most three).
            for max_tokens in sorted({job[2]["max_tokens"] for job in jobs}):
                group = [job for job in jobs if job[2]["max_tokens"] == max_tokens]
                for start in range(0, len(group), self.teacher.batch_size):
                    chunk = group[start:start + self.teacher.batch_size]
                    for job, reply in zip(chunk, self.teacher.complete_batch([job[2] for job in chunk])):
                        self.cache.put(job[3], identity, job[1].item, job[2], reply)
                        record(*job, reply)
        elif jobs:
            self._ask_concurrently(jobs, fetch, record)
        return [(outcome, answers[i]) for i, (outcome, _) in enumerate(pending)]

    def _ask_concurrently(self, jobs, fetch, record) -> None:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.settings.concurrency,
                                                     thread_name_prefix="teacher")
        futures = {pool.submit(fetch, *job): job for job in jobs}
        failure: BaseException | None = None
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    reply = future.result()
                except TeacherUnavailable as err:
                    failure = failure or err
                    self.teacher.stop()
                    continue
                except UserError as err:
                    failure = failure or err
                    self.teacher.stop()
                    continue
                record(*futures[future], reply)
        except BaseException:
            # Ctrl+C: no new requests, no more waiting to retry; the requests in flight finish (and are cached)
            # while the interpreter exits, and everything cached serves the next run.
            self.teacher.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise failure

    # ---------------------------------------------------------------- the whole run

    def run(self) -> dict[str, Any]:
        s = self.settings
        against_entries: list[dict[str, str]] = list(s.against_entries or [])
        if s.against is not None and s.against_entries is None:
            against_entries = read_dataset(s.against).entries
        if self.cache.damaged_lines:
            damaged = plural(self.cache.damaged_lines, "línea dañada", "líneas dañadas")
            self.log(f"Aviso: la caché «{s.cache_path}» tenía {damaged} "
                     f"(una ejecución cortada a mitad de escritura); esas peticiones se repiten.")
        outcomes = [Outcome(item) for item in plan_items(s.topics, s.counts)]
        self.log(f"Plan: {plural(len(s.topics), 'tema')} × ({s.counts.essay} ensayos + {s.counts.short} respuestas "
                 f"cortas + {s.counts.misconception} errores típicos) = {plural(len(outcomes), 'entrada')}; "
                 f"profesor {self.teacher.identity().split('|', 1)[-1]}; caché «{s.cache_path}» "
                 f"({plural(len(self.cache.entries), 'respuesta guardada', 'respuestas guardadas')}).")
        progress = Progress(len(outcomes), self.totals, self.teacher.counters, s)
        pending = [(o, 0) for o in outcomes]
        try:
            for attempt in range(s.json_retries + 1):
                if not pending:
                    break
                progress.total = progress.done + len(pending)
                retry = []
                for outcome, reply in self._ask_round(pending, progress):
                    outcome.attempts = attempt + 1
                    obj, repaired = parse_answer(reply.text)
                    entry = to_entry(obj, outcome.item.kind) if obj is not None else None
                    if entry is None:
                        retry.append((outcome, attempt + 1))
                        continue
                    outcome.entry, outcome.repaired = entry, repaired
                    if repaired:
                        self.totals.json_repaired += 1
                    else:
                        self.totals.json_clean += 1
                if attempt < s.json_retries:
                    self.totals.json_retried += len(retry)
                pending = retry
        finally:
            progress.step(final=True)
        for outcome, _ in pending:
            self.totals.json_failed += 1
            self._reject(outcome, "json", f"el profesor no devolvió un JSON utilizable con los campos pedidos "
                                          f"tras {plural(outcome.attempts, 'intento')}")
        self._check(outcomes, against_entries)
        return self._finish(outcomes, against_entries)

    # ---------------------------------------------------------------- checks

    @staticmethod
    def _reject(outcome: Outcome, category: str, reason: str) -> None:
        outcome.status, outcome.category, outcome.reason = "rejected", category, reason

    def _check(self, outcomes: list[Outcome], against: list[dict[str, str]]) -> None:
        # Delayed: data_clean loads numpy, which `00_destilar.py --help` does not need.
        from afinar.data.data_clean import find_exact_duplicates, find_near_duplicates, guess_language, is_foreign

        alive = [o for o in outcomes if o.status == "pending" and o.entry is not None]
        for outcome in alive:
            entries, _, problems = validate_records([outcome.entry], "respuesta del profesor", "respuesta")
            if problems:
                self._reject(outcome, "check", "no pasa la comprobación de datos: " + "; ".join(problems.listed))
                continue
            outcome.entry = entries[0]
            words = word_count(outcome.entry["output"])
            kind = outcome.item.kind
            if kind == "essay" and words < LONG_MIN_WORDS:
                self._reject(outcome, "length", f"ensayo demasiado corto: {words} palabras (mínimo {LONG_MIN_WORDS})")
            elif kind == "short" and words > SHORT_MAX_WORDS:
                self._reject(outcome, "length", f"respuesta corta demasiado larga: {words} palabras "
                                                f"(máximo {SHORT_MAX_WORDS})")
            elif kind == "misconception" and words >= LONG_MIN_WORDS:
                self._reject(outcome, "length", f"error típico con respuesta de {words} palabras: es un ensayo "
                                                f"(máximo {LONG_MIN_WORDS - 1})")
            if outcome.status != "pending":
                continue
            texts = [outcome.entry] + ([{"instruction": outcome.entry["rejected"], "output": ""}]
                                       if "rejected" in outcome.entry else [])
            for text in texts:
                language, probability = guess_language(text)
                if is_foreign(language, probability):
                    field_name = "rejected" if text is not outcome.entry else "instruction/output"
                    share = f"{probability:.2f}".replace(".", ",")
                    self._reject(outcome, "language", f"no está en español ({field_name}: «{language}», "
                                                      f"probabilidad {share})")
                    break

        alive = [o for o in outcomes if o.status == "pending" and o.entry is not None]
        pool = list(against) + [o.entry for o in alive]
        base = len(against)
        source = str(self.settings.against) if self.settings.against else ""

        def label(index: int) -> str:
            if index < base:
                return f"la entrada {index + 1} de «{source}»"
            return f"la entrada n.º {alive[index - base].item.number} de esta destilación"

        duplicates = {}
        for dup in find_exact_duplicates(pool):
            if dup.index >= base:
                duplicates.setdefault(dup.index, f"duplicado exacto de {label(dup.kept)}")
        survivors = [i for i in range(len(pool)) if i not in duplicates]
        for dup in find_near_duplicates(pool, survivors):
            if dup.index >= base and dup.index not in duplicates:
                similarity = f"{dup.similarity:.2f}".replace(".", ",")
                duplicates[dup.index] = f"casi duplicado (Jaccard {similarity}) de {label(dup.kept)}"
        for index, reason in duplicates.items():
            self._reject(alive[index - base], "duplicate", reason)

        alive = [o for o in outcomes if o.status == "pending" and o.entry is not None]
        misconceptions = [o for o in alive if o.item.kind == "misconception"]
        if self.base_scorer is not None and misconceptions:
            pairs = [{"pregunta": o.entry["instruction"], "verdadera": o.entry["output"],
                      "falsa": o.entry["rejected"]} for o in misconceptions]
            for outcome, score in zip(misconceptions, self.base_scorer(pairs)):
                if score["true_wins"]:
                    margin = f"{score['logp_true']:.1f} > {score['logp_false']:.1f}".replace(".", ",")
                    self._reject(outcome, "base_model", f"el modelo base ya acierta: prefiere la respuesta correcta "
                                                        f"(log p {margin})")
        for outcome in outcomes:
            if outcome.status == "pending":
                outcome.status = "kept"

    # ---------------------------------------------------------------- output and report

    def _finish(self, outcomes: list[Outcome], against: list[dict[str, str]]) -> dict[str, Any]:
        s = self.settings
        kept = [o.entry for o in outcomes if o.status == "kept"]
        written = (list(against) if s.merge else []) + kept
        if kept:
            atomic.write_json(s.output, written)
        summary = self._summary(outcomes, len(written) if kept else 0)
        report = s.report or default_report_path(s.output)
        atomic.write_json(report.with_suffix(".json"), {"summary": summary, "items": [
            {"n": o.item.number, "topic": o.item.topic, "kind": o.item.kind, "variant": o.item.variant,
             "status": o.status, "category": o.category, "reason": o.reason, "attempts": o.attempts,
             "repaired": o.repaired, "from_cache": o.from_cache} for o in outcomes]})
        atomic.write_text(report.with_suffix(".md"), self._markdown(outcomes, summary))
        summary["report"] = str(report.with_suffix(".md"))
        return summary

    def _summary(self, outcomes: list[Outcome], written: int) -> dict[str, Any]:
        s, t = self.settings, self.totals
        counters = self.teacher.counters
        rejected: dict[str, int] = {}
        for o in outcomes:
            if o.status == "rejected":
                rejected[o.category] = rejected.get(o.category, 0) + 1
        return {
            "teacher": self.teacher.identity(),
            "teacher_url": getattr(self.teacher, "base_url", None),
            "planned": len(outcomes),
            "kept": sum(o.status == "kept" for o in outcomes),
            "kept_by_kind": {k: sum(o.status == "kept" and o.item.kind == k for o in outcomes) for k in KINDS},
            "rejected": sum(o.status == "rejected" for o in outcomes),
            "rejected_by_reason": rejected,
            "answers_from_teacher": t.sent,
            "answers_from_cache": t.cached,
            "http_attempts": counters.requests,
            "retries": dict(counters.retries),
            "retry_wait_s": round(counters.waited_s, 2),
            "json_clean": t.json_clean,
            "json_repaired": t.json_repaired,
            "json_retried": t.json_retried,
            "json_failed": t.json_failed,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cached_prompt_tokens": t.cached_prompt_tokens,
            "cached_completion_tokens": t.cached_completion_tokens,
            "tokens_estimated": t.tokens_estimated,
            "cost": t.cost(s.price),
            "cost_saved_by_cache": t.cost(s.price, cached=True),
            "currency": s.currency if s.price else None,
            "output": str(s.output) if written else None,
            "entries_written": written,
            "merged_with": str(s.against) if s.merge and s.against else None,
            "cache": str(s.cache_path),
        }

    def _markdown(self, outcomes: list[Outcome], summary: dict[str, Any]) -> str:
        s = self.settings
        names = {"json": "JSON inutilizable", "check": "comprobación de datos", "length": "longitud de su clase",
                 "language": "no está en español", "duplicate": "duplicado",
                 "base_model": "el modelo base ya acierta"}
        retry_names = {"429": "429 (demasiadas peticiones)", "5xx": "errores 5xx del servidor",
                       "timeout": "tiempo de espera agotado", "connection": "conexión cortada o rechazada"}
        lines = [
            "# Informe de la destilación",
            "",
            f"- Profesor: `{summary['teacher'].split('|', 1)[-1]}`"
            + (f" en `{summary['teacher_url']}`" if summary["teacher_url"] else " (modelo local)"),
            f"- Plan: {plural(summary['planned'], 'entrada')} ({plural(len(s.topics), 'tema')})",
            f"- Conservadas: **{summary['kept']}** (ensayos {summary['kept_by_kind']['essay']}, respuestas cortas "
            f"{summary['kept_by_kind']['short']}, errores típicos {summary['kept_by_kind']['misconception']})",
            f"- Descartadas: **{summary['rejected']}**"
            + ("".join(f"; {names.get(k, k)}: {v}" for k, v in sorted(summary["rejected_by_reason"].items()))),
            "- Archivo de salida: "
            + (f"`{summary['output']}` ({plural(summary['entries_written'], 'entrada')}"
               + (f", incluidas las de `{summary['merged_with']}`" if summary["merged_with"] else "") + ")"
               if summary["output"] else "ninguno (no se conservó ninguna entrada)"),
            "",
            "## Peticiones",
            "",
            f"- Respuestas pedidas al profesor en esta ejecución: {summary['answers_from_teacher']}; tomadas de la "
            f"caché: {summary['answers_from_cache']}; intentos HTTP o generaciones: {summary['http_attempts']}",
            "- Reintentos: " + (", ".join(f"{retry_names.get(k, k)}: {v}"
                                          for k, v in sorted(summary["retries"].items()))
                                + f" (espera total {summary['retry_wait_s']:.1f} s)".replace(".", ",")
                                if summary["retries"] else "ninguno"),
            f"- JSON: correcto {summary['json_clean']}, reparado {summary['json_repaired']}, pedido de nuevo "
            f"{summary['json_retried']}, inutilizable tras todos los intentos {summary['json_failed']}",
            f"- Tokens de esta ejecución: {_thousands(summary['prompt_tokens'])} de entrada y "
            f"{_thousands(summary['completion_tokens'])} de salida"
            + (" (estimados: el servidor no informa del uso)" if summary["tokens_estimated"] else "")
            + f"; de la caché: {_thousands(summary['cached_prompt_tokens'])} y "
              f"{_thousands(summary['cached_completion_tokens'])}",
        ]
        if summary["cost"] is not None:
            lines.append(f"- Coste estimado de esta ejecución: {_money(summary['cost'], s.currency)} (ahorrado "
                         f"gracias a la caché: {_money(summary['cost_saved_by_cache'], s.currency)})")
        lines += ["", "## Entrada por entrada", "", "| n.º | tema | tipo | resultado | motivo |",
                  "|---|---|---|---|---|"]
        for o in outcomes:
            reason = o.reason.replace("|", "\\|").replace("\n", " ")
            status = "conservada" if o.status == "kept" else "descartada"
            if o.status == "kept" and o.repaired:
                reason = "JSON reparado"
            lines.append(f"| {o.item.number} | {o.item.topic.replace('|', '/')} | {KIND_NAMES[o.item.kind]} "
                         f"{o.item.variant} | {status} | {reason} |")
        return "\n".join(lines) + "\n"


def default_report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".informe.md")


def default_cache_path(output: Path) -> Path:
    return output.with_name(output.stem + ".cache.jsonl")
