"""What the loopback fakes (fake_hub, fake_teacher) share: writing one JSON answer on a request handler."""

from __future__ import annotations


def send_json(handler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """Status line, JSON content type and length, any extra headers, then the body."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
