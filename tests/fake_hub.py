"""A loopback stand-in for the Hugging Face Hub, enough for huggingface_hub 1.33 to push a folder.

Implements whoami-v2, repos/create, validate-yaml, preupload, the LFS batch API with basic
single-part uploads, commit (ndjson with base64 and LFS files) and repo info. Xet is never offered:
the client must run with HF_HUB_DISABLE_XET=1, because with hf_xet installed it would upload
through Xet's own storage protocol, which this server does not speak.

Every request is recorded (method, path with query, headers, body) and every committed file is
kept as bytes, so tests can check exactly what left the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from fake_http import send_json

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx", ".npz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


@dataclass
class Recorded:
    """One request as it arrived; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HubState:
    tokens: dict[str, dict[str, Any]]
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo_id -> path -> bytes
    lfs_store: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> bytes
    commits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # endpoint name -> HTTP status to answer
    lock: threading.Lock = field(default_factory=threading.Lock)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Start with `with FakeHub(tokens) as hub:`; `hub.endpoint` is the URL for HF_ENDPOINT.

    tokens: {token: {"name": "ana", "role": "write" | "read" | "fineGrained", "orgs": ["lab"] or
    [{"name": "lab", "roleInOrg": "read"}], "fineGrained": {...}}}; unknown tokens get 401.
    `hub.fail["commit"] = 500` makes the commit endpoint answer 500 (also: "create", "preupload",
    "lfs_batch", "lfs_upload", "whoami").
    """

    def __init__(self, tokens: dict[str, dict[str, Any]]):
        self.state = HubState(tokens=tokens)
        handler = type("Handler", (_Handler,), {"state": self.state, "hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._running = False

    def start(self) -> "FakeHub":
        self._thread.start()
        self._running = True
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket, so later connections are refused."""
        if self._running:
            self._server.shutdown()
            self._running = False
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what tests look at
    @property
    def fail(self) -> dict[str, int]:
        return self.state.fail

    @property
    def requests(self) -> list[Recorded]:
        with self.state.lock:
            return list(self.state.requests)

    def repo_files(self, repo_id: str) -> dict[str, bytes]:
        with self.state.lock:
            return dict(self.state.files.get(repo_id, {}))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    hub: FakeHub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        send_json(self, status, b"" if payload is None else json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Message": message})

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _user(self) -> dict[str, Any] | None:
        return self.state.tokens.get(self._token() or "")

    def _handle(self, method: str) -> None:
        body = self._read_body()
        with self.state.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.state.requests.append(Recorded(method, self.path, headers, body))
        path = unquote(urlsplit(self.path).path)
        try:
            self._route(method, path, body)
        except Exception as err:  # noqa: BLE001 - a broken request must not kill the server thread
            self._error(500, f"fake hub error: {type(err).__name__}: {err}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # --- routing
    def _route(self, method: str, path: str, body: bytes) -> None:
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/api/whoami-v2":
            return self._whoami()
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(body)
        if method == "PUT" and parts[0] == "__lfs_upload__" and len(parts) == 2:
            return self._lfs_upload(parts[1], body)
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            repo_id = path[1 : -len(".git/info/lfs/objects/batch")]
            return self._lfs_batch(repo_id, body)
        if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{parts[2]}/{parts[3]}"
            action = parts[4]
            if method == "POST" and action == "preupload":
                return self._preupload(repo_id, body)
            if method == "POST" and action == "commit":
                return self._commit(repo_id, body)
            if method == "GET" and action == "revision":
                return self._repo_info(repo_id)
        return self._error(404, f"fake hub: no route for {method} {path}")

    def _failing(self, name: str) -> bool:
        status = self.state.fail.get(name)
        if status:
            self._error(status, f"fake hub: {name} configured to fail")
            return True
        return False

    def _can_write(self, user: dict[str, Any] | None, repo_id: str) -> bool:
        if user is None:
            return False
        namespace = repo_id.split("/")[0]
        org_names = [o if isinstance(o, str) else o["name"] for o in user.get("orgs", [])]
        if namespace != user["name"] and namespace not in org_names:
            return False
        if user.get("role") == "write":
            return True
        for scope in (user.get("fineGrained") or {}).get("scoped", []):
            if "repo.write" in scope.get("permissions", []) and scope["entity"]["name"] in (namespace, repo_id):
                return True
        return False

    # --- endpoints
    def _whoami(self) -> None:
        if self._failing("whoami"):
            return
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        orgs = [
            {"type": "org", "name": o, "roleInOrg": "write"} if isinstance(o, str) else {"type": "org", **o}
            for o in user.get("orgs", [])
        ]
        access: dict[str, Any] = {"displayName": "prueba", "role": user["role"], "createdAt": "2025-01-01T00:00:00Z"}
        if user.get("fineGrained") is not None:
            access["fineGrained"] = user["fineGrained"]
        self._send(200, {
            "type": "user",
            "id": "0" * 24,
            "name": user["name"],
            "fullname": user["name"].title(),
            "isPro": False,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": access},
        })

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        if not content.startswith("---"):
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
        except yaml.YAMLError as err:
            return self._send(400, {"errors": [{"message": f"invalid yaml: {err}"}], "warnings": []})
        if not isinstance(meta, dict):
            return self._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> None:
        if self._failing("create"):
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or (self._user() or {}).get('name')}/{payload['name']}"
        if self._user() is None:
            return self._error(401, "Invalid credentials in Authorization header")
        if not self._can_write(self._user(), repo_id):
            return self._error(403, "You don't have the rights to create a model under this namespace")
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.state.repos[repo_id] = {"visibility": payload.get("visibility", "public")}
            self.state.files[repo_id] = {}
            self.state.commits[repo_id] = []
        self._send(200, {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _repo_or_404(self, repo_id: str) -> bool:
        if repo_id not in self.state.repos:
            self._error(404, f"Repository not found: {repo_id}")
            return False
        if not self._can_write(self._user(), repo_id):
            self._error(403, "Forbidden: token cannot write this repository")
            return False
        return True

    def _preupload(self, repo_id: str, body: bytes) -> None:
        if self._failing("preupload") or not self._repo_or_404(repo_id):
            return
        answers = []
        stored = self.state.files[repo_id]
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE
            previous = stored.get(entry["path"])
            oid = None
            if previous is not None:
                oid = hashlib.sha256(previous).hexdigest() if lfs else git_blob_sha1(previous)
            answers.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answers, "commitOid": self._head(repo_id)})

    def _lfs_batch(self, repo_id: str, body: bytes) -> None:
        if self._failing("lfs_batch") or not self._repo_or_404(repo_id):
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_store:
                answer["actions"] = {"upload": {"href": f"{self.hub.endpoint}/__lfs_upload__/{obj['oid']}"}}
            objects.append(answer)
        # No "xet" transfer is ever chosen, whatever the client offers.
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, oid: str, body: bytes) -> None:
        if self._failing("lfs_upload"):
            return
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        with self.state.lock:
            self.state.lfs_store[oid] = body
        self._send(200, {})

    def _commit(self, repo_id: str, body: bytes) -> None:
        if self._failing("commit") or not self._repo_or_404(repo_id):
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changes: dict[str, bytes | None] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs_store:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = self.state.lfs_store[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        oid = hashlib.sha1(body).hexdigest()
        with self.state.lock:
            files = self.state.files[repo_id]
            for path, data in changes.items():
                if data is None:
                    for existing in [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]:
                        del files[existing]
                else:
                    files[path] = data
            self.state.commits[repo_id].append({"oid": oid, "summary": header.get("summary"),
                                                "paths": sorted(changes)})
        self._send(200, {"success": True, "commitOid": oid,
                         "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}"})

    def _head(self, repo_id: str) -> str:
        commits = self.state.commits.get(repo_id) or []
        return commits[-1]["oid"] if commits else "0" * 40

    def _repo_info(self, repo_id: str) -> None:
        if repo_id not in self.state.repos:
            return self._error(404, f"Repository not found: {repo_id}")
        siblings = [{"rfilename": p} for p in sorted(self.state.files[repo_id])]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": self._head(repo_id),
                         "private": self.state.repos[repo_id]["visibility"] == "private",
                         "siblings": siblings})
