"""Secrets never printed: hide a token, and anything shaped like a Hub token, in a text before it is shown."""

from __future__ import annotations

import re

HUB_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{10,}")


def redact(text: str, secret: str | None, mask: str = "hf_***", hub_tokens: bool = True) -> str:
    """`text` without `secret`; with `hub_tokens`, also without any other Hub-token-shaped string (a token
    that leaked into an error message from another source, e.g. a URL)."""
    if secret:
        text = text.replace(secret, mask)
    return HUB_TOKEN_RE.sub(mask, text) if hub_tokens else text
