"""Distillation (00_destilar.py): a loopback fake OpenAI server, the cache, the key, bad input, the embedded
teacher, and training on the result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afinar.data import distill, teacher
from afinar.data.data_check import read_dataset
from afinar.data.data_mix import LONG_MIN_WORDS, word_count
from afinar.core.errors import UserError
from conftest import ROOT, copy_output, run_script

sys.path.insert(0, str(Path(__file__).parent))
from fake_teacher import FakeTeacher, answer_object  # noqa: E402

PLANTED_KEY = "sk-PLANTED-0123456789-distill-secret"


def _topics(tmp_path: Path, *topics: str) -> Path:
    path = tmp_path / "temas.txt"
    path.write_text("\n".join(topics) + "\n", encoding="utf-8")
    return path


def _settings(tmp_path: Path, topics: list[str], essay=1, short=2, misconception=1, **extra) -> distill.Settings:
    return distill.Settings(topics=topics, counts=distill.Counts(essay, short, misconception),
                            cache_path=tmp_path / "cache.jsonl", output=tmp_path / "out.json", **extra)


def _http(fake: FakeTeacher, **kw) -> teacher.HttpTeacher:
    key = kw.pop("key", None)
    options = {"timeout": 0.5, "max_retries": 3, "backoff": 0.01}
    options.update(kw)
    return teacher.HttpTeacher(fake.url, "fake-model", key, **options)


def _report(tmp_path: Path, name: str = "out") -> dict:
    return json.loads((tmp_path / f"{name}.informe.json").read_text(encoding="utf-8"))


def _cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------- parsing


def test_parse_answer_repairs_what_models_do_and_gives_up_on_the_rest():
    good = {"pregunta": "¿Qué es el estroma?", "respuesta": "El líquido interior del cloroplasto."}
    text = json.dumps(good, ensure_ascii=False)
    assert distill.parse_answer(text) == (good, False)
    fenced = "```json\n" + text[:-1] + ",\n}\n```"
    assert distill.parse_answer(fenced) == (good, True)
    assert distill.parse_answer("Claro:\n" + text + "\n¡Suerte!") == (good, True)
    assert distill.parse_answer(text[:-2]) == (good, True)  # cut before the closing quote and brace
    raw_newline = '{"pregunta": "¿Qué es?", "respuesta": "Línea uno\nlínea dos"}'
    assert distill.parse_answer(raw_newline)[0]["respuesta"] == "Línea uno\nlínea dos"
    assert distill.parse_answer("<think>Quizá {\"x\": 1}... no.</think>\n" + text) == (good, False)
    assert distill.parse_answer("Lo siento, no puedo {") == (None, False)
    assert distill.parse_answer("") == (None, False)
    # English key names are accepted; a misconception without its wrong answer is not an entry.
    assert distill.to_entry({"Question": "¿Q?", "answer": "R."}, "short") == {
        "instruction": "¿Q?", "input": "", "output": "R."}
    assert distill.to_entry({"pregunta": "¿Q?", "respuesta_correcta": "R."}, "misconception") is None


# --------------------------------------------------------------------------------------------------- fake server


SCRIPT = ["429", "fenced", "503", "broken", "slow", "english", "wrong_length", "copy", "prose", "envelope",
          "429_plain", "no_usage"]


def test_fake_server_retries_repairs_and_rejections_are_counted(tmp_path):
    against = read_dataset(ROOT / "tu_dataset.json").entries
    topics = ["fase luminosa", "ciclo de Calvin", "estomas"]
    settings = _settings(tmp_path, topics, essay=1, short=2, misconception=1, against=ROOT / "tu_dataset.json",
                         concurrency=4, price=(0.5, 2.0))
    # 'copy' answers with an entry of tu_dataset.json of the requested kind's length, so it is a duplicate and
    # nothing else whichever item it lands on.
    copies = {"essay": against[1], "short": against[0], "misconception": against[0]}
    assert word_count(against[1]["output"]) >= LONG_MIN_WORDS and word_count(against[0]["output"]) <= 40
    with FakeTeacher(SCRIPT, copy_entries=copies, slow_s=1.5) as fake:
        the_teacher = _http(fake)
        began = time.perf_counter()
        summary = distill.Distiller(the_teacher, settings, log=lambda m: None).run()
        elapsed = time.perf_counter() - began
    planned = len(topics) * 4
    assert summary["planned"] == planned
    # Every scripted misbehaviour was met once: 2 x 429, 1 x 503, 1 timeout (the slow answer).
    assert summary["retries"] == {"429": 2, "5xx": 1, "timeout": 1}
    assert summary["retry_wait_s"] >= 1.0  # the first 429 said Retry-After: 1 and was honoured
    assert elapsed >= 1.0
    # Attempts = one per item + one per retry + the re-asks after broken / envelope answers.
    assert summary["json_retried"] == 2 and summary["json_failed"] == 0
    assert summary["json_repaired"] == 2  # fenced with a trailing comma, prose around the object
    assert the_teacher.counters.requests == planned + 4 + 2 == fake.count
    assert summary["answers_from_teacher"] == planned + 2
    assert summary["rejected_by_reason"] == {"language": 1, "length": 1, "duplicate": 1}
    assert summary["kept"] == planned - 3
    assert summary["tokens_estimated"] is True  # one answer came without a usage block
    assert summary["cost"] == pytest.approx((summary["prompt_tokens"] * 0.5 + summary["completion_tokens"] * 2.0) / 1e6)

    report = _report(tmp_path)
    assert len(report["items"]) == planned
    reasons = {item["category"]: item["reason"] for item in report["items"] if item["status"] == "rejected"}
    assert "no está en español" in reasons["language"]
    assert "tu_dataset.json" in reasons["duplicate"] and "duplicado exacto" in reasons["duplicate"]
    assert "palabras" in reasons["length"]
    markdown = (tmp_path / "out.informe.md").read_text(encoding="utf-8")
    assert "429 (demasiadas peticiones): 2" in markdown and "reparado 2" in markdown
    assert markdown.count("| descartada |") == 3 and markdown.count("| conservada |") == planned - 3

    written = read_dataset(tmp_path / "out.json").entries  # the project's own check accepts the output
    assert len(written) == planned - 3
    essays = [e for e in written if word_count(e["output"]) >= LONG_MIN_WORDS]
    shorts = [e for e in written if word_count(e["output"]) <= distill.SHORT_MAX_WORDS]
    assert len(essays) == summary["kept_by_kind"]["essay"] and essays
    assert all("rejected" in e for e in written if e not in essays and e not in shorts)
    assert sum("rejected" in e for e in written) == summary["kept_by_kind"]["misconception"]


def test_rerun_takes_everything_from_the_cache(tmp_path):
    settings = _settings(tmp_path, ["ciclo de Calvin"], essay=1, short=2, misconception=1)
    with FakeTeacher(["broken"]) as fake:
        first = distill.Distiller(_http(fake), settings, log=lambda m: None).run()
        out = (tmp_path / "out.json").read_bytes()
        count = fake.count
        second = distill.Distiller(_http(fake), settings, log=lambda m: None).run()
        assert fake.count == count == 5  # 4 items + 1 re-ask; the rerun asked nothing
    assert second["answers_from_cache"] == 5 and second["answers_from_teacher"] == 0
    assert second["cached_completion_tokens"] == first["completion_tokens"]
    assert (tmp_path / "out.json").read_bytes() == out


def test_server_that_dies_midway_resumes_from_the_cache_without_repeating(tmp_path):
    settings = _settings(tmp_path, ["fotosistemas", "pigmentos"], essay=1, short=3, misconception=1,
                         concurrency=2)
    planned = 10
    with FakeTeacher(die_after=4) as fake:
        with pytest.raises(teacher.TeacherUnavailable) as err:
            distill.Distiller(_http(fake, max_retries=1), settings, log=lambda m: None).run()
    assert "caché" in str(err.value) and "mismo comando" in str(err.value)
    assert not (tmp_path / "out.json").exists()
    cached = _cache_lines(tmp_path / "cache.jsonl")
    assert len(cached) == 4
    with FakeTeacher() as fake:  # a new server (new port): same model name, so the cache applies
        summary = distill.Distiller(_http(fake), settings, log=lambda m: None).run()
        assert fake.count == planned - 4
    assert summary["answers_from_cache"] == 4 and summary["answers_from_teacher"] == planned - 4
    assert summary["kept"] == planned
    assert len(_cache_lines(tmp_path / "cache.jsonl")) == planned


def test_killed_process_resumes_and_a_torn_cache_line_is_skipped(tmp_path):
    topics = _topics(tmp_path, "fase oscura", "cloroplastos")
    out = tmp_path / "datos.json"
    cache = tmp_path / "datos.cache.jsonl"
    args = [sys.executable, "00_destilar.py", "--topics", str(topics), "--teacher-model", "fake",
            "--essays-per-topic", "1", "--answers-per-topic", "2", "--misconceptions-per-topic", "1",
            "--concurrency", "1", "--output", str(out)]
    planned = 8
    with FakeTeacher(["good"] * 3, default="hold") as fake:
        proc = subprocess.Popen(args + ["--teacher-url", fake.url], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while fake.count < 4 and time.time() < deadline:
            time.sleep(0.05)
        assert fake.count == 4  # three answered, the fourth hangs
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(_cache_lines(cache)) == 3
    with open(cache, "ab") as handle:
        handle.write(b'{"key": "torn by a kill", "reply": {"te')  # what a kill mid-write leaves behind
    with FakeTeacher() as fake:
        proc = run_script(*args[1:], "--teacher-url", fake.url)
        assert fake.count == planned - 3
    assert "1 línea dañada" in proc.stdout
    assert len(read_dataset(out).entries) == planned
    assert len(distill.Cache(cache).entries) == planned


def test_planted_key_is_used_but_never_written_or_printed(tmp_path):
    topics = _topics(tmp_path, "respiración celular")
    env = {"TEACHER_API_KEY": PLANTED_KEY}
    common = ["00_destilar.py", "--topics", str(topics), "--teacher-model", "fake", "--essays-per-topic", "0",
              "--answers-per-topic", "2", "--misconceptions-per-topic", "1", "--output", str(tmp_path / "o.json"),
              "--max-retries", "2"]
    with FakeTeacher(["leak"]) as fake:
        ok = run_script(*common, "--teacher-url", fake.url, env=env)
        assert fake.authorization == {f"Bearer {PLANTED_KEY}"}  # the key was really sent
    with FakeTeacher(["401_leak"]) as fake:
        refused = run_script(*common, "--teacher-url", fake.url, "--cache", str(tmp_path / "c2.jsonl"), env=env,
                             check=False)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and "***" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "TEACHER_API_KEY" in ok.stdout  # where the key came from is said, the key is not
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"o.json", "o.cache.jsonl", "o.informe.md", "o.informe.json"}
    for path in files:
        assert PLANTED_KEY not in path.read_text(encoding="utf-8", errors="replace"), path
        assert PLANTED_KEY[8:30] not in path.read_text(encoding="utf-8", errors="replace"), path
    for text in (ok.stdout, ok.stderr, refused.stdout, refused.stderr):
        assert PLANTED_KEY not in text


# --------------------------------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = run_script("00_destilar.py", *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ERROR:" in proc.stderr
    return proc


def test_bad_input_is_a_spanish_message_with_exit_2(tmp_path):
    topics = _topics(tmp_path, "fotosíntesis C4")
    empty = tmp_path / "vacio.txt"
    empty.write_text("\n# solo un comentario\n\n", encoding="utf-8")
    broken = tmp_path / "roto.json"
    broken.write_text('[{"instruction": "¿Qué?", "output": "Esto."},\n{"instruction": "sin cerrar"', encoding="utf-8")
    url = ["--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"]
    out = ["--output", str(tmp_path / "o.json")]
    cases = [
        (["--topics", str(tmp_path / "no_existe.txt"), *url, *out], ["no_existe.txt", "--topics"]),
        (["--topics", str(empty), *url, *out], ["vacio.txt", "está vacío"]),
        (["--topics", str(topics), "--teacher-url", "localhost:11434", "--teacher-model", "m", *out],
         ["--teacher-url", "localhost:11434"]),
        (["--topics", str(topics), "--teacher-url", "https://x.example/v1?key=abc", "--teacher-model", "m", *out],
         ["--teacher-url", "TEACHER_API_KEY"]),
        (["--topics", str(topics), *url, "--essays-per-topic", "-1", *out], ["--essays-per-topic", "-1"]),
        (["--topics", str(topics), *url, "--essays-per-topic", "0", "--answers-per-topic", "0",
          "--misconceptions-per-topic", "0", *out], ["nada que generar"]),
        (["--topics", str(topics), *url, "--answers-per-topic", "dos", *out], ["--answers-per-topic", "dos"]),
        (["--topics", str(topics), *url, "--concurrency", "0", *out], ["--concurrency"]),
        (["--topics", str(topics), *url, "--price-per-mtok", "barato", *out], ["--price-per-mtok", "barato"]),
        (["--topics", str(topics), *url, "--against", str(tmp_path / "falta.json"), *out], ["falta.json", "--against"]),
        (["--topics", str(topics), "--teacher-model", str(tmp_path), *out], ["--teacher-model", "config.json"]),
        (["--topics", str(topics), *url, "--against", str(broken), *out], ["roto.json", "JSON no válido"]),
        (["--topics", str(topics), *url, "--cache", str(tmp_path), *out], ["--cache", "carpeta"]),
        (["--topics", str(topics), *url, "--against", str(broken), "--output", str(broken)], ["--merge"]),
        (["--topics", str(topics), *url], []),  # unreachable server, checked below
    ]
    for args, expected in cases[:-1]:
        proc = _bad(tmp_path, *args)
        for text in expected:
            assert text in proc.stderr, (args, proc.stderr)
    proc = _bad(tmp_path, "--topics", str(topics), *url, *out, "--max-retries", "0", "--cache",
                str(tmp_path / "c.jsonl"))
    assert "no se pudo conectar" in proc.stderr and "mismo comando" in proc.stderr


def test_read_topics_and_counts_name_the_field(tmp_path):
    path = _topics(tmp_path, "ciclo de Calvin", "Ciclo de  Calvin", "# comentario", "", "estomas")
    assert distill.read_topics(path) == ["ciclo de Calvin", "estomas"]
    (tmp_path / "latin1.txt").write_bytes("fotosíntesis\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt.*UTF-8"):
        distill.read_topics(tmp_path / "latin1.txt")
    with pytest.raises(UserError, match="--misconceptions-per-topic"):
        distill.check_counts(1, 1, 10_000)
    assert distill.parse_price("0.1,0.4") == (0.1, 0.4) and distill.parse_price("2") == (2.0, 2.0)


# --------------------------------------------------------------------------------------------------- real teacher


@pytest.mark.slow
def test_embedded_model_as_teacher_end_to_end(tmp_path, embedded_path):
    topics = _topics(tmp_path, "la fotosíntesis")
    args = ["00_destilar.py", "--topics", str(topics), "--teacher-model", "smollm2-135m", "--essays-per-topic", "0",
            "--answers-per-topic", "1", "--misconceptions-per-topic", "1", "--max-tokens", "24", "--json-retries",
            "1", "--output", str(tmp_path / "local.json")]
    # 24 tokens per answer: what is checked is the bookkeeping of every attempt (kept, rejected with a reason,
    # retried, cached), which holds for answers of any length.
    # One thread: on the shared 2-core test machine two OpenMP threads spin-wait against other processes and
    # generation ran 5x slower (43 s against 9 s for 48 tokens); the code path is the same.
    env = {"OMP_NUM_THREADS": "1"}
    first = run_script(*args, check=False, timeout=600, env=env)
    assert first.returncode in (0, 1), first.stdout + first.stderr  # 1: the 135M model wrote nothing usable
    assert "Traceback" not in first.stderr
    report = _report(tmp_path, "local")
    summary, items = report["summary"], report["items"]
    assert summary["teacher"] == "local|smollm2-135m"
    assert len(items) == summary["planned"] == 2
    for item in items:  # every generated item is accounted for: kept, or rejected with its reason
        assert item["status"] in ("kept", "rejected")
        assert item["status"] == "kept" or item["reason"]
    assert summary["kept"] + summary["rejected"] == 2
    # One generation per item per attempt, every one of them cached.
    assert summary["answers_from_teacher"] == 2 + summary["json_retried"] == summary["http_attempts"]
    assert len(_cache_lines(tmp_path / "local.cache.jsonl")) == summary["answers_from_teacher"]
    assert (first.returncode == 0) == (summary["kept"] > 0) == (tmp_path / "local.json").exists()
    second = run_script(*args, check=False, timeout=600, env=env)
    again = _report(tmp_path, "local")["summary"]
    assert again["answers_from_teacher"] == 0 and again["answers_from_cache"] == summary["answers_from_teacher"]
    assert second.returncode == first.returncode


@pytest.mark.slow
def test_base_model_filter_keeps_only_misconceptions_it_fails(tmp_path, embedded_path):
    from afinar.evaluate import probe
    from afinar.data.teacher import LocalTeacher

    base = LocalTeacher("smollm2-135m")
    scored: list[dict] = []

    def scorer(pairs):
        scores = probe.score_pairs(base.model, base.tokenizer, pairs)
        scored.extend(scores)
        return scores

    settings = _settings(tmp_path, ["fotorrespiración", "clorofila"], essay=0, short=0, misconception=3)
    with FakeTeacher() as fake:
        summary = distill.Distiller(_http(fake), settings, base_scorer=scorer, log=lambda m: None).run()
    assert len(scored) == 6
    wins = sum(s["true_wins"] for s in scored)
    assert summary["rejected_by_reason"].get("base_model", 0) == wins
    assert summary["kept"] == 6 - wins
    items = _report(tmp_path)["items"]
    assert all("el modelo base ya acierta" in i["reason"] for i in items if i["status"] == "rejected")


# --------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_fake_server_output_trains_in_03(tmp_path, stage02_dir):
    settings = _settings(tmp_path, ["fase luminosa", "ciclo de Calvin", "estomas"], essay=1, short=2,
                         misconception=1, against=ROOT / "tu_dataset.json", merge=False)
    with FakeTeacher(["fenced", "english"]) as fake:
        summary = distill.Distiller(_http(fake), settings, log=lambda m: None).run()
    assert summary["kept"] == 11
    out = copy_output(stage02_dir, tmp_path / "salida")
    proc = run_script("03_train_model.py", "--output-dir", str(out), "--dataset", str(tmp_path / "out.json"),
                      "--max-steps", "1", "--preference", "none", "--batch-size", "1", "--max-seq-length", "128")
    assert (out / "adapter" / "adapter_model.safetensors").exists(), proc.stdout[-2000:]
    train = json.loads((out / "run.json").read_text(encoding="utf-8"))["stages"]["train"]
    assert train["status"] == "done" and train["dataset"] == str(tmp_path / "out.json")
    data = train["data"]
    assert data["source"]["entries"] == 11
    # 03's own screening agrees with the distiller's: nothing left to drop, long and short both present.
    assert data["cleaning"]["exact_duplicates"] == data["cleaning"]["near_duplicates"] == 0
    assert data["cleaning"]["non_spanish"] == 0
    assert data["mix"]["long"] > 0 and data["mix"]["short"] > 0
    assert train["metrics"]["global_step"] == 1


def test_answer_object_is_spanish_and_of_the_right_length():
    """The fake server's own answers must pass, or the tests above would test the fake, not the code."""
    from afinar.data.data_clean import guess_language

    for kind, marker in (("essay", "ensayo"), ("short", "pregunta concreta"), ("misconception", "error típico")):
        obj = answer_object(f"Tema: x\n\n{marker}", "good")
        entry = distill.to_entry(obj, kind)
        assert guess_language(entry)[0] == "es"
        words = word_count(entry["output"])
        assert (words >= LONG_MIN_WORDS) if kind == "essay" else (words <= distill.SHORT_MAX_WORDS or kind != "short")


def test_ctrl_c_exits_130_and_answers_in_flight_are_still_cached(tmp_path):
    topics = _topics(tmp_path, "fase luminosa")
    # Slow answers of 5 s: Ctrl+C must land while they are in flight, even on a loaded machine.
    with FakeTeacher(["good", "slow", "slow", "slow"], slow_s=5) as fake:
        proc = subprocess.Popen(
            [sys.executable, "00_destilar.py", "--topics", str(topics), "--teacher-url", fake.url, "--teacher-model",
             "fake", "--output", str(tmp_path / "c.json"), "--concurrency", "3", "--timeout", "30",
             "--essays-per-topic", "0", "--answers-per-topic", "4", "--misconceptions-per-topic", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # pytest-xdist's workers ignore SIGINT and a child inherits that: give it back the terminal's default,
            # so Python turns Ctrl+C into KeyboardInterrupt as it does for a user.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while fake.count < 4 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrumpido" in err and "Traceback" not in err
    # The three slow answers were paid for while the user pressed Ctrl+C: they are in the cache.
    assert len(distill.Cache(tmp_path / "c.cache.jsonl").entries) == 4
    assert not (tmp_path / "c.json").exists()


def test_key_comes_from_the_environment_or_colab_secrets(monkeypatch):
    import types
    from email.utils import formatdate

    for name in teacher.KEY_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "google", None)  # not in Colab: no key, and no error
    assert teacher.find_api_key() == (None, None)

    class SecretNotFound(Exception):
        pass

    def get(name):
        if name != "GEMINI_API_KEY":
            raise SecretNotFound(name)
        return PLANTED_KEY

    userdata = types.SimpleNamespace(get=get)
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert teacher.find_api_key() == (PLANTED_KEY, "secreto de Colab GEMINI_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert teacher.find_api_key() == ("sk-from-env", "variable de entorno OPENAI_API_KEY")
    # Retry-After: delta-seconds or an HTTP date.
    assert teacher._retry_after({"Retry-After": "7"}) == 7.0
    assert 25 <= teacher._retry_after({"Retry-After": formatdate(time.time() + 30, usegmt=True)}) <= 31
    assert teacher._retry_after({}) is None


def test_readme_distillation_commands_use_real_flags():
    """Every 00_destilar.py command in the README parses with the script's own options."""
    import shlex

    from afinar.stages import distill_cli

    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("python3 00_destilar.py")]
    assert len(commands) >= 2
    urls = set()
    for command in commands:
        args = distill_cli.parse_args(shlex.split(command)[2:])
        assert args.topics == "temas.txt" and args.teacher_model
        urls.add(args.teacher_url)
        distill.parse_price(args.price_per_mtok)
        teacher.check_base_url(args.teacher_url)
    assert {"http://localhost:11434/v1", "https://generativelanguage.googleapis.com/v1beta/openai"} <= urls


def test_odd_but_valid_envelopes_are_read_and_bad_ones_become_an_empty_answer():
    client = teacher.HttpTeacher("http://127.0.0.1:9/v1", "m", None)
    parts = b'{"choices":[{"message":{"content":[{"type":"text","text":"{\\"a\\": 1}"}]}}],' \
            b'"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    assert client._parse(parts) == teacher.Reply('{"a": 1}', 3, 4)
    assert client._parse(b'{"choices":[{"message":{"content":5}}]}').text == ""
    assert client._parse(b"<html>502 Bad Gateway</html>") == teacher.Reply("", 0, 0, tokens_estimated=True)
