"""Publishing to the Hugging Face Hub: find the token, check write access early, push the artifacts.

The token only ever travels in the Authorization header that huggingface_hub builds: it is never
printed, logged, stored in run.json or in a model card, nor passed on a command line. A push only
reads the output directory, so a failed push leaves every local artifact as it was.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.manifest import now_iso, STAGE_SCRIPTS
from afinar.core.redaction import redact

TOKEN_ENV = "HF_TOKEN"
PARTS = ("adapter", "merged", "gguf")

# Where each artifact lands in the Hub repo. The merged model sits at the root so that
# `from_pretrained(repo_id)` works without a subfolder; the adapter and the GGUF files go beside it.
REPO_FOLDERS = {"merged": "", "adapter": "adapter", "gguf": "gguf"}

# The merged model goes last: its README becomes the root card only once the other parts are there.
PUSH_ORDER = ("adapter", "gguf", "merged")

# Leftovers of interrupted atomic writes (".name.XXXX.tmp") and hidden files are never published.
IGNORE_PATTERNS = [".*", "*/.*", "*.tmp", "*.tmp.*"]

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID_RE = re.compile(rf"^({_REPO_PART})/({_REPO_PART})$")

_PART_NAMES_ES = {
    "adapter": "el adaptador LoRA",
    "merged": "el modelo fusionado",
    "gguf": "los archivos GGUF",
}
_PART_STAGE = {"adapter": "train", "merged": "export", "gguf": "export"}


# --------------------------------------------------------------------------------------------- token


def get_token() -> str | None:
    """The token huggingface_hub itself would use, else the Colab secret HF_TOKEN; None when there is none."""
    return find_token()[0]


def find_token() -> tuple[str | None, str]:
    """(token, where it came from: "env", "login" or "colab"); the source goes to run.json, the token never.

    huggingface_hub.get_token() looks where the Hub's own tools do: HF_TOKEN, then the token file that
    `hf auth login` or `notebook_login()` leaves (HF_TOKEN_PATH, or HF_HOME/token), then Colab's secrets
    from inside a notebook kernel. A user who logged in that way must not be told there is no token.
    """
    env_token = (os.environ.get(TOKEN_ENV) or "").strip()
    if env_token:
        return env_token, "env"
    try:
        from huggingface_hub import get_token as hub_get_token

        token = (hub_get_token() or "").strip()
    except Exception:  # noqa: BLE001 - an OIDC exchange that fails, an unreadable token file: no token then
        token = ""
    if token:
        return token, "login"
    token = _token_from_colab()
    return (token, "colab") if token else (None, "none")


def _running_in_colab() -> bool:
    # Only inside the notebook kernel, where google.colab is already imported: in a `!python` child
    # process the secrets API has no kernel to ask, so it is not even tried there.
    return "google.colab" in sys.modules


def _token_from_colab() -> str | None:
    if not _running_in_colab():
        return None
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        token = userdata.get(TOKEN_ENV)
    except Exception:  # noqa: BLE001 - no secret, access refused, or not inside the notebook kernel
        return None
    token = (token or "").strip() if isinstance(token, str) else ""
    return token or None


def missing_token_message() -> str:
    return (
        "No se encontró el token de Hugging Face, necesario para publicar con --push. "
        "Crea un token con permiso de escritura en https://huggingface.co/settings/tokens y:\n"
        "  - en una terminal, inicia sesión con «hf auth login» (el token queda guardado para las próximas "
        "veces) o guárdalo en la variable de entorno HF_TOKEN sin que quede en el historial: "
        "read -rs HF_TOKEN && export HF_TOKEN\n"
        "  - en Colab, añádelo como secreto llamado HF_TOKEN (icono de la llave, panel «Secretos») y "
        "activa «Acceso del cuaderno»; si lanzas el script con !python, copia antes el secreto al entorno "
        "en una celda: import os; from google.colab import userdata; "
        "os.environ['HF_TOKEN'] = userdata.get('HF_TOKEN')\n"
        "No pases nunca el token como argumento en la línea de órdenes."
    )


# ------------------------------------------------------------------------------------------- helpers


def parse_repo_id(repo_id: str | None) -> tuple[str, str]:
    """Split `usuario/nombre`; a malformed id is a user error, caught before any network call."""
    match = _REPO_ID_RE.match(repo_id or "")
    if not match or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(
            f"--repo-id '{repo_id}' no es válido: usa el formato usuario/nombre (por ejemplo "
            "ana/smollm2-biologia), con letras, números, '-', '_' o '.', sin empezar ni terminar "
            "en '-' o '.', sin '--' ni '..' y de 96 caracteres como máximo por parte."
        )
    return match.group(1), match.group(2)


def hub_endpoint() -> str:
    """HF_ENDPOINT read now, not at import time, so a value set after import is still honoured."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _api(token: str):
    from huggingface_hub import HfApi

    from afinar import __version__

    return HfApi(endpoint=hub_endpoint(), token=token, library_name="afinar", library_version=__version__)


def _refuse_offline_mode() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise UserError(
            "El modo sin conexión de Hugging Face está activo (HF_HUB_OFFLINE=1 o TRANSFORMERS_OFFLINE=1) "
            "y no se puede publicar. Quita esa variable del entorno para el paso de publicación "
            "(por ejemplo: env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE python ...)."
        )


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    # RuntimeError: LFS uploads are wrapped in it; ValueError: malformed server answers and
    # rejected README metadata; OSError: connection failures and HfHubHTTPError's base class.
    return (HfHubHTTPError, httpx.HTTPError, OSError, RuntimeError, ValueError)


# -------------------------------------------------------------------------------------- access check


def check_push_access(repo_id: str, token: str | None) -> dict[str, Any]:
    """Verify, before any heavy work, that `token` may create and write `repo_id`.

    Returns a dict without secrets (user, namespace, token role, endpoint) for run.json.
    Raises UserError (in Spanish) for a malformed repo id, a missing, invalid or read-only token,
    or a namespace that is neither the user nor one of their organisations.
    """
    namespace, _ = parse_repo_id(repo_id)
    if not token:
        raise UserError(missing_token_message())
    _refuse_offline_mode()
    endpoint = hub_endpoint()
    info = _whoami(token, endpoint)
    user = info.get("name") if isinstance(info.get("name"), str) else None
    orgs = _org_roles(info)
    access = _access_token_info(info)
    role = access.get("role") if isinstance(access.get("role"), str) else None

    if namespace != user and namespace not in orgs:
        known = ", ".join([n for n in [user, *orgs] if n]) or "ninguno"
        raise UserError(
            f"El token pertenece a '{user}' y no puede publicar en el espacio '{namespace}' de --repo-id "
            f"{repo_id}. Espacios permitidos: {known}. Usa --repo-id {user or 'tu_usuario'}/<nombre> o "
            "un token de una cuenta que sea miembro de esa organización."
        )
    if not _token_can_write(access, namespace, repo_id):
        raise UserError(
            f"El token de '{user}' es de solo lectura (rol '{role or 'desconocido'}') y no permite crear ni "
            f"escribir {repo_id}. Crea en https://huggingface.co/settings/tokens un token con rol «Write» "
            "(o uno «Fine-grained» con permiso de escritura en repositorios de ese espacio) y guárdalo en "
            "HF_TOKEN o en el secreto HF_TOKEN de Colab."
        )
    if namespace in orgs and orgs[namespace] == "read":
        raise UserError(
            f"'{user}' solo tiene permiso de lectura en la organización '{namespace}' y no puede publicar "
            f"{repo_id}. Pide a un administrador de '{namespace}' el rol «write» o publica en tu usuario."
        )
    return {
        "repo_id": repo_id,
        "user": user,
        "namespace": namespace,
        "namespace_kind": "user" if namespace == user else "org",
        "namespace_ok": True,
        "token_role": role or "desconocido",
        "token_source": find_token()[1],
        "endpoint": endpoint,
        "checked_at": now_iso(),
    }


def _whoami(token: str, endpoint: str) -> dict[str, Any]:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = _api(token).whoami()
    except HfHubHTTPError as err:
        if _status_code(err) == 401:
            raise UserError(
                "El token de Hugging Face (HF_TOKEN) no es válido o ha caducado: el Hub lo rechazó (401). "
                "Crea uno nuevo con permiso de escritura en https://huggingface.co/settings/tokens y "
                "actualiza HF_TOKEN o el secreto HF_TOKEN de Colab."
            ) from None
        raise UserError(
            f"No se pudo comprobar el token en {endpoint} (HTTP {_status_code(err)}): "
            f"{redact(str(err), token)}. Vuelve a intentarlo más tarde."
        ) from None
    except _network_errors() as err:
        raise UserError(
            f"No se pudo contactar con el Hub en {endpoint} para comprobar el token: "
            f"{redact(f'{type(err).__name__}: {err}', token)}. Revisa la conexión a internet "
            "(y HF_ENDPOINT si lo has cambiado) y vuelve a intentarlo."
        ) from None
    if not isinstance(info, dict):
        raise UserError(f"Respuesta inesperada de {endpoint}/api/whoami-v2: no es un objeto JSON.")
    return info


def _org_roles(info: dict[str, Any]) -> dict[str, str | None]:
    roles: dict[str, str | None] = {}
    for org in info.get("orgs") or []:
        if isinstance(org, dict) and isinstance(org.get("name"), str):
            role = org.get("roleInOrg")
            roles[org["name"]] = role if isinstance(role, str) else None
    return roles


def _access_token_info(info: dict[str, Any]) -> dict[str, Any]:
    auth = info.get("auth") if isinstance(info.get("auth"), dict) else {}
    access = auth.get("accessToken") if isinstance(auth.get("accessToken"), dict) else {}
    return access


def _token_can_write(access: dict[str, Any], namespace: str, repo_id: str) -> bool:
    """Classic tokens carry role read/write; fine-grained ones list permissions per entity.

    An unknown shape is given the benefit of the doubt: the push itself would still be refused
    by the Hub with a clear message, and blocking a valid token because the answer changed is worse.
    """
    role = access.get("role")
    if role in ("write", "admin"):
        return True
    if role == "read":
        return False
    if role != "fineGrained":
        return True
    fine = access.get("fineGrained") if isinstance(access.get("fineGrained"), dict) else {}
    global_perms = fine.get("global") if isinstance(fine.get("global"), list) else []
    if "repo.write" in global_perms:
        return True
    for scope in fine.get("scoped") or []:
        if not isinstance(scope, dict):
            continue
        entity = scope.get("entity") if isinstance(scope.get("entity"), dict) else {}
        permissions = scope.get("permissions") if isinstance(scope.get("permissions"), list) else []
        if "repo.write" not in permissions:
            continue
        if entity.get("type") in ("user", "org") and entity.get("name") == namespace:
            return True
        if entity.get("type") == "model" and entity.get("name") == repo_id:
            return True
    return False


# ----------------------------------------------------------------------------------------------- push


def retry_command(layout: OutputLayout, repo_id: str, *, private: bool = False,
                  parts: Iterable[str] = PARTS) -> str:
    """The 04 command line that repeats only the upload, with the same repo, visibility and parts."""
    command = (
        f"python {STAGE_SCRIPTS['export']} --output-dir {shlex.quote(str(layout.root))} "
        f"--push-only --repo-id {shlex.quote(repo_id)}"
    )
    if private:
        command += " --private"
    if set(parts) != set(PARTS):
        command += f" --what {','.join(p for p in PARTS if p in parts)}"
    return command


def artifact_folder(layout: OutputLayout, part: str) -> Path:
    return {"adapter": layout.adapter, "merged": layout.merged, "gguf": layout.gguf_dir}[part]


def files_to_send(folder: Path) -> list[str]:
    """Relative POSIX paths that upload_folder will send, with the same filters it applies."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    relpaths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(relpaths, ignore_patterns=IGNORE_PATTERNS + list(DEFAULT_IGNORE_PATTERNS)))


def _selected_parts(what: Iterable[str]) -> list[str]:
    what = [what] if isinstance(what, str) else list(what)
    unknown = [p for p in what if p not in PARTS]
    if unknown or not what:
        raise UserError(
            f"Partes a publicar no válidas: {', '.join(unknown) or '(ninguna)'}. "
            f"Elige entre: {', '.join(PARTS)}."
        )
    return [p for p in PUSH_ORDER if p in what]


def _require_artifacts(layout: OutputLayout, parts: list[str]) -> dict[str, list[str]]:
    """Every selected part must exist locally before the first byte is sent."""
    found: dict[str, list[str]] = {}
    for part in parts:
        folder = artifact_folder(layout, part)
        files = files_to_send(folder) if folder.is_dir() else []
        if part == "gguf" and not any(f.endswith(".gguf") for f in files):
            files = []
        if not files:
            script = STAGE_SCRIPTS[_PART_STAGE[part]]
            raise UserError(
                f"No se puede publicar {_PART_NAMES_ES[part]}: falta {folder} (o está vacío). Lo crea "
                f"python {script} --output-dir {shlex.quote(str(layout.root))}; ejecútalo antes o quita "
                f"'{part}' de lo que se publica."
            )
        found[part] = files
    return found


def push(
    layout: OutputLayout,
    repo_id: str,
    token: str | None,
    *,
    private: bool = False,
    what: Iterable[str] = PARTS,
) -> dict[str, Any]:
    """Create `repo_id` if needed and upload the selected artifact folders, one commit per part.

    Repo layout: merged model at the root, LoRA adapter in `adapter/`, GGUF files in `gguf/`.
    Only reads the output directory, so `--push-only` can call it again on existing artifacts.
    Returns a dict for run.json (url, commit ids, files sent; never the token).
    Raises UserError for missing artifacts or token, and for a failed push, with the command to retry.
    """
    parse_repo_id(repo_id)
    if not token:
        raise UserError(missing_token_message())
    parts = _selected_parts(what)
    files = _require_artifacts(layout, parts)
    _refuse_offline_mode()
    api = _api(token)
    record: dict[str, Any] = {
        "repo_id": repo_id,
        "endpoint": hub_endpoint(),
        "private": bool(private),
        "layout": {part: (REPO_FOLDERS[part] or ".") for part in parts},
        "parts": {},
    }
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        record["url"] = str(url)
        for part in parts:
            record["parts"][part] = _upload_part(api, layout, repo_id, part, files[part])
        if "merged" not in parts:
            record["root_card"] = _upload_root_card(api, layout, repo_id, parts)
    except _network_errors() as err:
        retry = retry_command(layout, repo_id, private=private, parts=parts)
        raise UserError(_push_failed_message(layout, repo_id, err, token, record, retry)) from None
    record["pushed_at"] = now_iso()
    return record


def _upload_part(api, layout: OutputLayout, repo_id: str, part: str, files: list[str]) -> dict[str, Any]:
    folder = artifact_folder(layout, part)
    path_in_repo = REPO_FOLDERS[part]
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        path_in_repo=path_in_repo or None,
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message=f"afinar: sube {_PART_NAMES_ES[part]}",
    )
    prefix = f"{path_in_repo}/" if path_in_repo else ""
    return {
        "local_folder": str(folder.relative_to(layout.root)),
        "path_in_repo": path_in_repo or ".",
        "commit": getattr(info, "oid", None),
        "commit_url": getattr(info, "commit_url", None),
        "files": [prefix + f for f in files],
        "bytes": sum((folder / f).stat().st_size for f in files),
    }


def _upload_root_card(api, layout: OutputLayout, repo_id: str, parts: list[str]) -> dict[str, Any] | None:
    """Without the merged model at the root, the first pushed card also becomes the repo's card."""
    for part in parts:
        card = artifact_folder(layout, part) / "README.md"
        if card.is_file():
            info = api.upload_file(
                path_or_fileobj=str(card),
                path_in_repo="README.md",
                repo_id=repo_id,
                repo_type="model",
                commit_message="afinar: ficha del modelo",
            )
            return {"from": f"{REPO_FOLDERS[part]}/README.md", "commit": getattr(info, "oid", None)}
    return None


def _push_failed_message(
    layout: OutputLayout, repo_id: str, err: BaseException, token: str, record: dict, retry: str
) -> str:
    status = _status_code(err)
    detail = redact(f"{type(err).__name__}: {err}", token)
    cause = err.__cause__
    if cause is not None and str(cause) not in str(err):
        detail += redact(f" ({type(cause).__name__}: {cause})", token)
    done = ", ".join(record.get("parts", {})) or "ninguna"
    if status in (401, 403):
        hint = "El Hub rechazó el token: comprueba que tiene permiso de escritura sobre ese repositorio."
    else:
        hint = "Puede ser un fallo de red o del Hub."
    return (
        f"Falló la publicación en {record.get('endpoint')}/{repo_id} "
        f"(HTTP {status if status is not None else 'sin respuesta'}). {hint}\n"
        f"Detalle: {detail}\n"
        f"Partes ya publicadas: {done}. Los archivos locales de {layout.root} están intactos; "
        f"para reintentar solo la publicación, sin recalcular nada:\n  {retry}"
    )
