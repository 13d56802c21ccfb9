"""Teachers for the distillation step: an OpenAI-compatible chat endpoint, or a local transformers model.

Both answer a list of chat requests and return, per request, the text and the token counts. The HTTP teacher
retries what a real API throws at a long run (429 with or without Retry-After, 5xx, timeouts, dropped
connections) with exponential backoff; anything else (401, 404, a bad URL) stops the run at once, because
retrying a wrong key or a wrong model name only burns time.

The API key lives only in this module's Authorization header. It is never part of a cache key, a log line or
an error message: server error bodies are echoed with the key blanked out, since some APIs quote the key they
refused.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from afinar.core import embedded
from afinar.core.errors import UserError
from afinar.core.prompts import ensure_pad_token
from afinar.core.redaction import redact
from afinar.evaluate.generation import _answer_chunk, _generate_options, _inference, _seed_everything, chat_prompt_ids

# Checked in this order; the first one set wins. TEACHER_API_KEY first, so a user can point the teacher at a
# different account than the OPENAI_API_KEY other tools on the machine use.
KEY_NAMES = ("TEACHER_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_RETRIES = 6
DEFAULT_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
# A server asking for more than this is treated as "come back much later": the run stops and resumes from the
# cache, instead of sleeping for an hour inside one request.
MAX_RETRY_AFTER_S = 300.0
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529}
MAX_ERROR_BODY_CHARS = 300


@dataclass
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    tokens_estimated: bool = False


@dataclass
class Counters:
    """What the teacher had to survive; shared by every worker thread, so updated under a lock."""

    requests: int = 0  # HTTP attempts sent (or local generations)
    retries: dict[str, int] = field(default_factory=dict)  # reason -> count: "429", "5xx", "timeout", "connection"
    waited_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def count_retry(self, reason: str, wait: float) -> None:
        with self._lock:
            self.retries[reason] = self.retries.get(reason, 0) + 1
            self.waited_s += wait


class TeacherUnavailable(UserError):
    """The teacher kept failing after every retry; what was already answered stays in the cache."""


def find_api_key(names: Sequence[str] = KEY_NAMES) -> tuple[str | None, str | None]:
    """(key, where it came from) from the environment, else from Colab's secrets; (None, None) if absent.

    Local servers (Ollama, llama.cpp, vLLM without --api-key) need no key, so a missing key is not an error.
    """
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value, f"variable de entorno {name}"
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not in Colab (or an old Colab without secrets)
        return None, None
    for name in names:
        try:
            value = (userdata.get(name) or "").strip()
        except Exception:  # noqa: BLE001 - SecretNotFoundError, NotebookAccessError: try the next name
            continue
        if value:
            return value, f"secreto de Colab {name}"
    return None, None


def check_base_url(url: str) -> str:
    """The endpoint's base URL without a trailing slash; UserError for anything that is not http(s)://host."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--teacher-url «{url}» no es una URL http:// o https:// válida "
                        f"(p. ej. http://localhost:11434/v1).")
    if parsed.username or parsed.password or parsed.query:
        # A key pasted into the URL would end up in the report and the cache; it belongs in TEACHER_API_KEY.
        raise UserError("--teacher-url no debe llevar usuario, contraseña ni parámetros (?key=...): pon la clave "
                        "en la variable de entorno TEACHER_API_KEY.")
    return url.strip().rstrip("/")


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpTeacher:
    """POST {base_url}/chat/completions, the OpenAI chat format every compatible server accepts."""

    kind = "http"

    def __init__(self, base_url: str, model: str, api_key: str | None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = DEFAULT_BACKOFF_S,
                 max_backoff: float = MAX_BACKOFF_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = check_base_url(base_url)
        self.model = model
        self._key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.counters = Counters()
        self._sleep = sleep
        self._stop = threading.Event()

    def identity(self) -> str:
        """What goes into the cache key: the same question to another model is another request.

        The model name, not the URL: the same model behind another address or port (localhost vs 127.0.0.1, a
        restarted server) gives the same answers, and a resumed run must not pay for them again.
        """
        return f"api|{self.model}"

    def stop(self) -> None:
        """Make waiting workers give up (another request already failed for good)."""
        self._stop.set()

    def _hide_key(self, text: str) -> str:
        # Any provider's key, not only the Hub's: mask it whole, and leave other hf_-shaped text alone.
        return redact(text, self._key, mask="***", hub_tokens=False)

    def _wait(self, attempt: int, reason: str, retry_after: float | None) -> None:
        if retry_after is not None:
            wait = retry_after
        else:
            # Full jitter: concurrent workers that hit the same 429 do not all come back at the same instant.
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        self.counters.count_retry(reason, wait)
        if self._stop.wait(wait):
            raise TeacherUnavailable("La ejecución se detuvo porque otra petición falló.")

    def complete(self, body: dict[str, Any]) -> Reply:
        payload = json.dumps({"model": self.model, **body}, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = f"{self.base_url}/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise TeacherUnavailable("La ejecución se detuvo porque otra petición falló.")
            self.counters.count_request()
            request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._parse(raw)
            except urllib.error.HTTPError as err:
                try:
                    raw_body = err.read(2000)
                except (OSError, http.client.HTTPException):
                    raw_body = b""  # the server closed the connection mid-body: the status is enough
                body = self._hide_key(raw_body.decode("utf-8", "replace"))[:MAX_ERROR_BODY_CHARS]
                last = f"HTTP {err.code}: {body}"
                if err.code not in RETRYABLE_STATUS:
                    raise UserError(self._fatal_message(err.code, body)) from None
                reason = "429" if err.code == 429 else "5xx" if err.code >= 500 else str(err.code)
                retry_after = _retry_after(err.headers)
                if retry_after is not None and retry_after > MAX_RETRY_AFTER_S:
                    raise TeacherUnavailable(
                        f"El profesor ({self.base_url}) pide esperar {retry_after:.0f} s (Retry-After); "
                        f"vuelve a ejecutar más tarde el mismo comando: continúa desde la caché.") from None
            except (TimeoutError, socket.timeout):
                reason, last = "timeout", f"sin respuesta en {self.timeout:g} s"
            except urllib.error.URLError as err:
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    reason, last = "timeout", f"sin respuesta en {self.timeout:g} s"
                else:
                    reason, last = "connection", f"no se pudo conectar ({self._hide_key(str(err.reason))})"
            except (http.client.HTTPException, ConnectionError, OSError) as err:
                reason, last = "connection", f"conexión cortada ({type(err).__name__})"
            if attempt == self.max_retries:
                break
            self._wait(attempt, reason, retry_after)
        raise TeacherUnavailable(
            f"El profesor ({self.base_url}, modelo «{self.model}») sigue fallando tras {self.max_retries} "
            f"reintentos; último error: {last}. Las respuestas ya recibidas están en la caché: vuelve a ejecutar "
            f"el mismo comando para continuar sin repetirlas.")

    def _fatal_message(self, code: int, body: str) -> str:
        hint = {
            400: "la petición no es válida para este servidor (¿el modelo admite chat?)",
            401: "la clave no es válida o falta (TEACHER_API_KEY u OPENAI_API_KEY)",
            403: "la clave no tiene permiso para este modelo",
            404: "no existe esa ruta o ese modelo (revisa --teacher-url, que suele terminar en /v1, y "
                 "--teacher-model)",
        }.get(code, "el servidor rechazó la petición")
        return f"El profesor ({self.base_url}) respondió HTTP {code}: {hint}. Respuesta: {body.strip() or '(vacía)'}"

    def _parse(self, raw: bytes) -> Reply:
        try:
            data = json.loads(raw.decode("utf-8"))
            message = data["choices"][0]["message"]
            text = message.get("content") or ""
            if isinstance(text, list):  # content as a list of parts, as some compatible servers send it
                text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
            if not isinstance(text, str):
                text = ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            # The envelope itself is not OpenAI-shaped: the teacher's answer is empty, and the distiller
            # treats it like unusable JSON (retried, then rejected), rather than stopping the run.
            return Reply(text="", prompt_tokens=0, completion_tokens=0, tokens_estimated=True)
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens")
        if isinstance(prompt_tokens, int) and isinstance(completion_tokens, int):
            return Reply(text, prompt_tokens, completion_tokens)
        # No usage block (some llama.cpp builds): ~4 characters a token, marked as an estimate in the report.
        return Reply(text, len(raw) // 4, len(text) // 4, tokens_estimated=True)


class LocalTeacher:
    """A transformers model folder (or the embedded 'smollm2-135m'), answering requests in batches, offline."""

    kind = "local"

    def __init__(self, name: str, *, batch_size: int = 8, seed: int = 0) -> None:
        self.name = name
        path = embedded.ensure_checkpoint(verbose=True) if name == embedded.EMBEDDED_ALIAS else name
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise UserError(f"--teacher-model «{name}»: no es una carpeta de modelo de transformers (falta "
                            f"config.json) ni «{embedded.EMBEDDED_ALIAS}». Para un servidor usa --teacher-url.")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.batch_size = batch_size
        self.seed = seed
        self.counters = Counters()

    def identity(self) -> str:
        return f"local|{self.name}"

    def stop(self) -> None:
        pass

    def complete_batch(self, bodies: Sequence[dict[str, Any]]) -> list[Reply]:
        """One reply per body; every body in a call must share max_tokens (the caller groups them)."""
        ensure_pad_token(self.tokenizer)
        prompts = [chat_prompt_ids(self.tokenizer, body["messages"]) for body in bodies]
        max_tokens = int(bodies[0]["max_tokens"])
        temperature = float(bodies[0].get("temperature", 0.0))
        options = _generate_options(self.model, self.tokenizer, max_tokens, do_sample=temperature > 0)
        if temperature > 0:
            options["temperature"] = temperature
        _seed_everything(self.seed)
        replies = []
        with _inference(self.model):
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                for prompt, row in zip(chunk, _answer_chunk(self.model, self.tokenizer, chunk, options)):
                    self.counters.count_request()
                    replies.append(Reply(row["text"], len(prompt), row["new_tokens"]))
        return replies
