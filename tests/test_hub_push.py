"""Publishing to a loopback fake Hub: exact files arrive, the token stays in the Authorization header,
access problems stop the run early, and a failed push leaves the output directory untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from afinar.export import hub
from afinar.core import manifest
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.export.model_card import write_model_card
from fake_hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_FAKEtoken1234567890abcdef"
READ_TOKEN = "hf_FAKEreadonly0987654321zyxw"
REPO_ID = "ana/asistente-bio"

# What 04_inference_and_export.py does around publishing: check access first, then the heavy work,
# then push and record the result in run.json. The token comes from the environment only.
DRIVER = r"""
import argparse, json
from pathlib import Path
from afinar.core import manifest
from afinar.export import hub
from afinar.core.errors import main_guard
from afinar.core.layout import OutputLayout

@main_guard
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--push-only", action="store_true")
    args = parser.parse_args()
    layout = OutputLayout.at(args.output_dir)
    token = hub.get_token()
    access = hub.check_push_access(args.repo_id, token)
    if not args.push_only:
        (layout.root / "heavy_work_started").write_text("1")
    data = manifest.read(layout)
    result = hub.push(layout, args.repo_id, token)
    data["stages"]["export"]["hub"] = {"access": access, "push": result}
    manifest.write(layout, data)
    print("publicado:", result["url"])

main()
"""


def _manifest() -> dict:
    # Every field the run.json schema requires (afinar.core.manifest), as stage 02 writes them.
    base = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_path": "/no/usado", "backend": "hf",
            "load_in_4bit": False}
    done = {"status": "done", "finished_at": "2026-01-01T00:00:00+00:00"}
    return {
        "schema": 1,
        "model": {"base_model": base["model"], "base_path": base["base_path"], "backend": "hf", "load_in_4bit": False},
        "settings": {**base, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_seq_length": 256,
                     "learning_rate": 2e-4, "epochs": 1, "max_steps": 10, "batch_size": 2, "grad_accum": 1,
                     "seed": 42, "warmup_ratio": 0.05, "save_steps": 50, "save_minutes": 10.0, "logging_steps": 5,
                     "precision": "fp32"},
        "stages": {
            "load": dict(done),
            "train": {**done, "data": {"train_entries": 20, "eval_entries": 4, "long": 8, "short": 12,
                                       "duplicates_dropped": 1},
                      "metrics": {"final_loss": 1.5, "tokens_per_second": 300.0}},
            "export": dict(done),
        },
    }


def _make_output_dir(root: Path) -> OutputLayout:
    layout = OutputLayout.at(root)
    data = _manifest()
    layout.adapter.mkdir(parents=True)
    (layout.adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 16),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 8)},
              str(layout.adapter / "adapter_model.safetensors"))
    # Leftover of an interrupted atomic write: must never be published.
    (layout.adapter / ".adapter_model.k3j2.tmp.safetensors").write_bytes(b"half written")
    write_model_card(layout.adapter, kind="adapter", manifest=data, contrast_md=None, repo_id=REPO_ID)

    layout.merged.mkdir()
    (layout.merged / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    save_file({"model.embed_tokens.weight": torch.randn(32, 16).to(torch.bfloat16)},
              str(layout.merged / "model.safetensors"))
    (layout.merged / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    write_model_card(layout.merged, kind="merged", manifest=data, contrast_md="| a | b |\n| --- | --- |",
                     repo_id=REPO_ID)

    layout.gguf_dir.mkdir()
    (layout.gguf_dir / "asistente-bio-f16.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(2048))
    (layout.gguf_dir / "Modelfile").write_text("FROM ./asistente-bio-f16.gguf\nPARAMETER temperature 0.2\n")
    write_model_card(layout.gguf_dir, kind="gguf", manifest=data, contrast_md=None, repo_id=REPO_ID)
    manifest.write(layout, data)
    return layout


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_driver(fake: FakeHub, layout: OutputLayout, tmp_path: Path, *extra: str, token: str | None = TOKEN,
                repo_id: str = REPO_ID) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "COLAB_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=fake.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    argv = [sys.executable, "-c", DRIVER, "--output-dir", str(layout.root), "--repo-id", repo_id, *extra]
    assert not any(token and token in arg for arg in argv)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _expected_repo_files(layout: OutputLayout) -> dict[str, bytes]:
    expected = {}
    for folder, prefix in ((layout.adapter, "adapter/"), (layout.merged, ""), (layout.gguf_dir, "gguf/")):
        for path in folder.iterdir():
            if not path.name.startswith("."):
                expected[prefix + path.name] = path.read_bytes()
    return expected


@pytest.fixture
def fake_hub():
    with FakeHub({
        TOKEN: {"name": "ana", "role": "write", "orgs": ["laboratorio"]},
        READ_TOKEN: {"name": "ana", "role": "read", "orgs": []},
        "hf_FAKEfinegrainedReadOnly12345": {"name": "ana", "role": "fineGrained", "orgs": [], "fineGrained": {
            "global": ["discussion.write"],
            "scoped": [{"entity": {"type": "user", "name": "ana"}, "permissions": ["repo.content.read"]}]}},
        "hf_FAKEfinegrainedWriter123456": {"name": "ana", "role": "fineGrained", "orgs": [], "fineGrained": {
            "global": [],
            "scoped": [{"entity": {"type": "user", "name": "ana"}, "permissions": ["repo.content.read",
                                                                                    "repo.write"]}]}},
        "hf_FAKEorgreader12345678901234": {"name": "luis", "role": "write",
                                           "orgs": [{"name": "laboratorio", "roleInOrg": "read"}]},
    }) as fake:
        yield fake


@pytest.fixture
def online(fake_hub, monkeypatch):
    """In-process calls: point at the fake Hub, whatever offline/Xet settings the CI shell has."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    return fake_hub


def test_push_sends_exact_files_and_token_only_in_authorization_header(fake_hub, tmp_path):
    layout = _make_output_dir(tmp_path / "salida")
    before = _hashes(layout.root)

    result = _run_driver(fake_hub, layout, tmp_path)

    assert result.returncode == 0, result.stderr
    assert fake_hub.repo_files(REPO_ID) == _expected_repo_files(layout)
    assert "adapter/.adapter_model.k3j2.tmp.safetensors" not in fake_hub.repo_files(REPO_ID)
    assert fake_hub.repo_files(REPO_ID)["README.md"] == (layout.merged / "README.md").read_bytes()
    # Pushing read the artifacts and only touched run.json (plus the driver's marker).
    after = _hashes(layout.root)
    assert {k: v for k, v in after.items() if k not in ("run.json", "heavy_work_started")} == \
        {k: v for k, v in before.items() if k != "run.json"}

    record = json.loads(layout.manifest.read_text())["stages"]["export"]["hub"]
    assert record["access"]["user"] == "ana" and record["access"]["token_role"] == "write"
    assert record["push"]["url"] == f"{fake_hub.endpoint}/{REPO_ID}"
    assert set(record["push"]["parts"]) == {"adapter", "merged", "gguf"}
    assert sorted(f for part in record["push"]["parts"].values() for f in part["files"]) == \
        sorted(_expected_repo_files(layout))
    assert all(len(part["commit"]) == 40 for part in record["push"]["parts"].values())

    # The token left the machine only as "Authorization: Bearer <token>".
    requests = fake_hub.requests
    authorized = [r for r in requests if r.headers.get("authorization") == f"Bearer {TOKEN}"]
    assert {r.path.split("?")[0] for r in authorized} >= {
        "/api/whoami-v2", "/api/repos/create", f"/api/models/{REPO_ID}/preupload/main",
        f"/api/models/{REPO_ID}/commit/main"}
    for request in requests:
        assert TOKEN not in request.path
        assert TOKEN.encode() not in request.body
        leaking = [k for k, v in request.headers.items() if TOKEN in v and k != "authorization"]
        assert not leaking, (request.method, request.path, leaking)
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for path in list(layout.root.rglob("*")) + list((tmp_path / "hf_home").rglob("*")):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_missing_token_stops_before_heavy_work(fake_hub, tmp_path):
    layout = _make_output_dir(tmp_path / "salida")

    result = _run_driver(fake_hub, layout, tmp_path, token=None)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "No se encontró el token de Hugging Face" in result.stderr
    assert "HF_TOKEN" in result.stderr and "Colab" in result.stderr
    assert not (layout.root / "heavy_work_started").exists()
    assert not [r for r in fake_hub.requests if r.path.startswith("/api/")]


def test_read_only_token_is_refused_before_heavy_work(fake_hub, tmp_path):
    layout = _make_output_dir(tmp_path / "salida")

    result = _run_driver(fake_hub, layout, tmp_path, token=READ_TOKEN)

    assert result.returncode == 2
    assert "solo lectura" in result.stderr and "Write" in result.stderr
    assert READ_TOKEN not in result.stderr
    assert not (layout.root / "heavy_work_started").exists()
    assert not [r for r in fake_hub.requests if r.path == "/api/repos/create"]
    assert fake_hub.repo_files(REPO_ID) == {}


def test_access_check_knows_fine_grained_tokens_orgs_and_namespaces(online):

    assert hub.check_push_access("laboratorio/modelo", TOKEN)["namespace_kind"] == "org"
    assert hub.check_push_access("ana/modelo", "hf_FAKEfinegrainedWriter123456")["token_role"] == "fineGrained"
    with pytest.raises(UserError, match="solo lectura"):
        hub.check_push_access("ana/modelo", "hf_FAKEfinegrainedReadOnly12345")
    with pytest.raises(UserError, match="no puede publicar en el espacio 'otra'") as wrong:
        hub.check_push_access("otra/modelo", TOKEN)
    assert "ana, laboratorio" in str(wrong.value)
    with pytest.raises(UserError, match="solo tiene permiso de lectura en la organización 'laboratorio'"):
        hub.check_push_access("laboratorio/modelo", "hf_FAKEorgreader12345678901234")
    with pytest.raises(UserError, match="no es válido o ha caducado") as invalid:
        hub.check_push_access("ana/modelo", "hf_FAKEunknownToken000000000")
    assert "hf_FAKEunknownToken000000000" not in str(invalid.value)
    with pytest.raises(UserError, match="usuario/nombre"):
        hub.check_push_access("sin-barra", TOKEN)
    assert all(token not in json.dumps(hub.check_push_access("ana/x", TOKEN)) for token in (TOKEN,))


def test_failed_commit_keeps_local_files_and_push_only_retry_completes(fake_hub, tmp_path):
    layout = _make_output_dir(tmp_path / "salida")
    fake_hub.fail["commit"] = 500
    before = _hashes(layout.root)

    failed = _run_driver(fake_hub, layout, tmp_path)

    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert "Falló la publicación" in failed.stderr and "HTTP 500" in failed.stderr
    assert f"--output-dir {layout.root} --push-only --repo-id {REPO_ID}" in failed.stderr
    assert TOKEN not in failed.stderr
    assert {k: v for k, v in _hashes(layout.root).items() if k != "heavy_work_started"} == before

    del fake_hub.fail["commit"]
    retried = _run_driver(fake_hub, layout, tmp_path, "--push-only")

    assert retried.returncode == 0, retried.stderr
    assert fake_hub.repo_files(REPO_ID) == _expected_repo_files(layout)


def test_unreachable_hub_keeps_local_files_and_explains_retry(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    layout = _make_output_dir(tmp_path / "salida")
    with FakeHub({TOKEN: {"name": "ana", "role": "write"}}) as stopped:
        endpoint = stopped.endpoint
    # The server is gone and its port closed: every connection is refused.
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    before = _hashes(layout.root)

    with pytest.raises(UserError) as err:
        hub.push(layout, REPO_ID, TOKEN, private=True, what=("gguf", "adapter"))

    message = str(err.value)
    assert "sin respuesta" in message and "están intactos" in message
    assert (f"python 04_inference_and_export.py --output-dir {layout.root} --push-only --repo-id {REPO_ID} "
            "--private --what adapter,gguf") in message
    assert TOKEN not in message
    assert _hashes(layout.root) == before


def test_missing_artifacts_name_the_stage_and_send_nothing(online, tmp_path):
    fake_hub = online
    layout = OutputLayout.at(tmp_path / "salida")
    layout.adapter.mkdir(parents=True)
    (layout.adapter / "adapter_config.json").write_text("{}")

    with pytest.raises(UserError, match="04_inference_and_export.py") as merged:
        hub.push(layout, REPO_ID, TOKEN, what=("adapter", "merged"))
    assert "modelo fusionado" in str(merged.value)
    with pytest.raises(UserError, match="03_train_model.py"):
        hub.push(OutputLayout.at(tmp_path / "vacia"), REPO_ID, TOKEN, what=("adapter",))
    with pytest.raises(UserError, match="Elige entre"):
        hub.push(layout, REPO_ID, TOKEN, what=("pesos",))
    assert fake_hub.requests == []


def test_adapter_only_push_puts_its_card_at_the_root(online, tmp_path):
    fake_hub = online
    layout = _make_output_dir(tmp_path / "salida")

    record = hub.push(layout, REPO_ID, TOKEN, private=True, what=["adapter"])

    files = fake_hub.repo_files(REPO_ID)
    assert set(files) == {"README.md", "adapter/README.md", "adapter/adapter_config.json",
                          "adapter/adapter_model.safetensors"}
    assert files["README.md"] == (layout.adapter / "README.md").read_bytes()
    assert record["private"] is True and record["root_card"]["from"] == "adapter/README.md"
    assert fake_hub.state.repos[REPO_ID]["visibility"] == "private"


def test_get_token_prefers_environment(monkeypatch, tmp_path):
    # A cached login elsewhere on this machine must not answer for "no token".
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setenv("HF_TOKEN", f"  {TOKEN}\n")
    assert hub.get_token() == TOKEN
    monkeypatch.delenv("HF_TOKEN")
    if "google.colab" not in sys.modules:
        assert hub.get_token() is None


def test_offline_mode_is_explained_before_any_request(online, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.check_push_access(REPO_ID, TOKEN)
    assert online.requests == []


def test_get_token_reads_the_colab_secret_only_inside_colab(monkeypatch, tmp_path):
    """google.colab only exists inside Colab, so its userdata module is recreated here with the same API."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no_token"))
    secrets = {"HF_TOKEN": TOKEN}

    def get(name):
        if name not in secrets:
            raise KeyError(name)  # Colab raises its own SecretNotFoundError here
        return secrets[name]

    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    if "google" not in sys.modules:
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)

    assert hub.get_token() == TOKEN
    del secrets["HF_TOKEN"]
    assert hub.get_token() is None


def test_export_script_push_only_and_missing_token(fake_hub, tmp_path):
    """The real 04 script: --push-only uploads the existing folder; --push without a token stops first."""
    layout = _make_output_dir(tmp_path / "salida")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=fake_hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"))
    script = [sys.executable, str(REPO_ROOT / "04_inference_and_export.py"), "--output-dir", str(layout.root),
              "--repo-id", REPO_ID]

    pushed = subprocess.run([*script, "--push-only"], env={**env, "HF_TOKEN": TOKEN}, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)

    assert pushed.returncode == 0, pushed.stderr
    assert fake_hub.repo_files(REPO_ID) == _expected_repo_files(layout)
    assert TOKEN not in pushed.stdout + pushed.stderr
    assert TOKEN not in layout.manifest.read_text()
    assert f"{fake_hub.endpoint}/{REPO_ID}" in layout.manifest.read_text()

    before = _hashes(layout.root)
    refused = subprocess.run([*script, "--push", "--overwrite"], env=env, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)

    assert refused.returncode == 2
    assert "No se encontró el token de Hugging Face" in refused.stderr
    assert _hashes(layout.root) == before  # nothing recomputed, nothing rewritten


@pytest.mark.parametrize("where", ["HF_HOME", "HF_TOKEN_PATH"])
def test_a_cached_login_is_found_without_hf_token(fake_hub, tmp_path, where):
    """`hf auth login` / notebook_login() leave the token in a file; huggingface_hub.get_token() finds it."""
    layout = _make_output_dir(tmp_path / "salida")
    token_file = tmp_path / "hf_home" / "token" if where == "HF_HOME" else tmp_path / "otra" / "mi_token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "COLAB_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=fake_hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    if where == "HF_TOKEN_PATH":
        env["HF_TOKEN_PATH"] = str(token_file)
    argv = [sys.executable, "-c", DRIVER, "--output-dir", str(layout.root), "--repo-id", REPO_ID]

    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "No se encontró el token" not in result.stderr
    assert fake_hub.repo_files(REPO_ID) == _expected_repo_files(layout)
    recorded = json.loads(layout.manifest.read_text(encoding="utf-8"))["stages"]["export"]["hub"]
    assert recorded["access"]["token_source"] == "login"
    assert TOKEN not in result.stdout + result.stderr + layout.manifest.read_text(encoding="utf-8")
