"""A loopback OpenAI-compatible chat server for the distillation tests and benchmark (no network).

It answers POST /v1/chat/completions with Spanish text made up from the request (so every request gets its own,
distinct answer), and misbehaves on demand: the `script` is a queue of behaviours consumed one per request
(`default` after it runs out), so a test knows exactly how many 429s, 5xx, timeouts, broken or English answers
the client met, whatever the concurrency.

Behaviours: good, fenced (```json with a trailing comma), prose (text around the object), truncated (cut before
the closing quote and brace), broken (no JSON at all), envelope (200 without "choices"), english, wrong_length
(an essay too short, a short answer too long), copy (the entry `copy_entries` gives for the request's kind),
no_usage, 429 (Retry-After:
`retry_after`), 429_plain (no Retry-After), 500, 503, slow (answers after `slow_s`), leak (500 whose body quotes
the Authorization header, as some APIs do), 401_leak, drop (closes the connection without answering), hold
(blocks until the server stops: a teacher that hangs while the client is killed).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fake_http import send_json

_SUBJECTS = ["la clorofila", "el cloroplasto", "la hoja", "el estroma", "la planta", "el fotosistema dos",
             "la enzima rubisco", "el tilacoide", "la célula del mesófilo", "el estoma", "la raíz", "el alga verde",
             "la cadena de transporte", "el pigmento accesorio", "la membrana interna", "el floema"]
_VERBS = ["absorbe", "transforma", "almacena", "libera", "necesita", "produce", "regula", "capta", "aprovecha",
          "convierte", "transporta", "protege", "acumula", "reparte", "consume", "recicla"]
_OBJECTS = ["la energía de la luz", "el dióxido de carbono", "los azúcares", "el oxígeno", "los electrones",
            "los protones", "el trifosfato de adenosina", "el poder reductor", "el agua del suelo",
            "las sales minerales",
            "la glucosa", "el almidón", "los fotones rojos", "la luz azul", "el nitrógeno", "la sacarosa"]
_TAILS = ["durante el día", "en la fase luminosa", "dentro del cloroplasto", "cuando hay suficiente agua",
          "en las hojas jóvenes", "a lo largo del ciclo de Calvin", "con ayuda de los pigmentos", "por la noche",
          "en los días nublados", "cerca de los nervios de la hoja", "mientras los estomas siguen abiertos",
          "según la temperatura del ambiente", "gracias a un gradiente químico", "sin gastar apenas energía",
          "antes de que anochezca", "en las plantas de climas secos"]
_ENGLISH = ("The chloroplast absorbs light energy during the day and converts it into chemical energy, which the "
            "plant then stores as sugars that feed every growing tissue of the leaf and the roots.")


def spanish_text(rng: random.Random, words: int) -> str:
    sentences = []
    count = 0
    while count < words:
        sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}, "
                    f"como indica la observación {rng.randint(100, 999_999)}.")
        sentence = sentence[0].upper() + sentence[1:]
        sentences.append(sentence)
        count += len(sentence.split())
    text = " ".join(sentences)
    return " ".join(text.split()[:words]).rstrip(",.") + "."


def _kind(user: str) -> str:
    if "ensayo" in user:
        return "essay"
    if "error típico" in user:
        return "misconception"
    return "short"


def answer_object(user: str, behaviour: str, copy_entries: dict | None = None) -> dict:
    kind = _kind(user)
    copy_entry = (copy_entries or {}).get(kind)
    rng = random.Random(hashlib.sha256(user.encode("utf-8")).digest())
    topic = user.split("\n", 1)[0].removeprefix("Tema: ")
    if behaviour == "copy" and copy_entry is not None:
        obj = {"pregunta": copy_entry["instruction"], "respuesta": copy_entry["output"]}
        if kind == "misconception":
            obj = {"pregunta": copy_entry["instruction"], "respuesta_correcta": copy_entry["output"],
                   "respuesta_erronea": "Lo contrario: " + copy_entry["output"]}
        return obj
    if behaviour == "english":
        words = {"essay": 190, "short": 25, "misconception": 40}[kind]
        text = ((_ENGLISH + " ") * 8).split()[:words]
        obj = {"pregunta": f"What does the chloroplast do in {topic}?", "respuesta": " ".join(text)}
        if kind == "misconception":
            obj = {"pregunta": obj["pregunta"], "respuesta_correcta": obj["respuesta"],
                   "respuesta_erronea": "It stores heat instead of light, because leaves are warm in the sun."}
        return obj
    words = {"essay": 190, "short": 24, "misconception": 45}[kind]
    if behaviour == "wrong_length":
        words = {"essay": 60, "short": 80, "misconception": 170}[kind]
    question = f"¿Qué ocurre con {rng.choice(_OBJECTS)} en {topic} (caso {rng.randint(1, 10**6)})?"
    if kind == "misconception":
        return {"pregunta": question, "respuesta_correcta": spanish_text(rng, words),
                "respuesta_erronea": spanish_text(rng, words)}
    return {"pregunta": question, "respuesta": spanish_text(rng, words)}


class FakeTeacher:
    def __init__(self, script=(), default: str = "good", *, retry_after: str = "1", slow_s: float = 2.0,
                 copy_entries: dict | None = None, die_after: int | None = None, latency_s: float = 0.0) -> None:
        self.script = deque(script)
        self.default = default
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.copy_entries = copy_entries  # kind -> entry that 'copy' returns
        self.die_after = die_after  # after this many requests every request is dropped (a dead server)
        self.latency_s = latency_s  # every answer waits this long, like a real API's time to answer
        self.count = 0
        self.seen: list[str] = []  # behaviour per request, in arrival order
        self.authorization: set[str] = set()
        self.lock = threading.Lock()
        self._stopped = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: pytest captures stderr
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length).decode("utf-8"))
                with fake.lock:
                    fake.count += 1
                    number = fake.count
                    if fake.die_after is not None and number > fake.die_after:
                        behaviour = "drop"
                    else:
                        behaviour = fake.script.popleft() if fake.script else fake.default
                    fake.seen.append(behaviour)
                    fake.authorization.add(self.headers.get("Authorization", ""))
                fake.respond(self, body, behaviour)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeTeacher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------------ answers

    def _send(self, handler, status: int, payload: bytes, headers: dict | None = None) -> None:
        try:
            send_json(handler, status, payload, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before this answer: what a slow real server sees too

    def respond(self, handler, body: dict, behaviour: str) -> None:
        user = body["messages"][-1]["content"]
        if behaviour == "drop":
            handler.close_connection = True
            try:
                handler.connection.shutdown(2)
            except OSError:
                pass
            return
        if behaviour == "hold":
            self._stopped.wait(60)
            return
        if behaviour in ("429", "429_plain"):
            headers = {"Retry-After": self.retry_after} if behaviour == "429" else {}
            return self._send(handler, 429, b'{"error": {"message": "rate limit"}}', headers)
        if behaviour in ("500", "503"):
            return self._send(handler, int(behaviour), b'{"error": {"message": "overloaded"}}')
        if behaviour in ("leak", "401_leak"):
            quoted = handler.headers.get("Authorization", "")
            message = json.dumps({"error": {"message": f"key rejected: {quoted}"}}).encode()
            return self._send(handler, 500 if behaviour == "leak" else 401, message)
        if behaviour == "envelope":
            return self._send(handler, 200, b'{"result": "ok"}')
        if behaviour == "slow":
            time.sleep(self.slow_s)
        elif self.latency_s:
            time.sleep(self.latency_s)
        obj = answer_object(user, behaviour, self.copy_entries)
        content = json.dumps(obj, ensure_ascii=False)
        if behaviour == "fenced":
            content = "```json\n" + json.dumps(obj, ensure_ascii=False, indent=1)[:-1].rstrip() + ",\n}\n```"
        elif behaviour == "prose":
            content = "Claro, aquí tienes el resultado:\n" + content + "\nEspero que te sirva."
        elif behaviour == "truncated":
            content = content[:-2]
        elif behaviour == "broken":
            content = "Lo siento, no puedo responder con ese formato {"
        reply = {"id": "fake", "object": "chat.completion", "model": body.get("model"),
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}]}
        if behaviour != "no_usage":
            reply["usage"] = {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4,
                              "total_tokens": len(user) // 4 + len(content) // 4}
        self._send(handler, 200, json.dumps(reply, ensure_ascii=False).encode("utf-8"))
