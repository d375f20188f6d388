"""Keep secrets out of what we record: MLflow params and tags, JSONL logs, logged dicts and resolved configs.

Three rules, applied wherever a tracker or a resolved config writes text:
- a config key whose name says secret (``hf_token``, ``db_password``, ``api_key``, ``secret``) logs ``***``;
- the value of an environment variable whose name says secret (``MY_API_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
  ``MLFLOW_TRACKING_PASSWORD``) is cut out of any logged text, however it got there (``${oc.env:...}``);
- a URI's ``user:password@`` part becomes ``***@``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
MIN_SECRET_LEN = 6
"""Shorter environment values are not cut out of text: "1" or "true" would mask half of every config."""
_SECRET_PARTS = ("secret", "password", "passwd", "credential", "apikey", "privatekey", "accesskey")
_SECRET_WORDS = {"token", "key", "pwd", "auth"}
_WORD_RE = re.compile(r"[^a-z0-9]+")
_URI_CREDENTIALS_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]+:[^/@\s]*@")


def is_secret_name(name: str) -> bool:
    """A config key (its last dotted part) whose name says it holds a secret. ``key_field`` or
    ``max_new_tokens`` do not: "key" counts only as the last word, "token" only as a whole word."""
    low = str(name).rsplit(".", 1)[-1].lower()
    words = [w for w in _WORD_RE.split(low) if w]
    if any(part in low for part in _SECRET_PARTS):
        return True
    return "token" in words or bool(words and words[-1] == "key")


_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})
"""The shell's working directories: "pwd" reads as a password word, but masking them would cut the working
directory out of every logged path."""


def is_secret_env(name: str) -> bool:
    """An environment variable whose name says secret: TOKEN, SECRET, PASSWORD or KEY anywhere in it."""
    if name.upper() in _NOT_SECRET_ENV:
        return False
    words = set(_WORD_RE.split(name.lower()))
    return is_secret_name(name) or bool(words & _SECRET_WORDS)


def secret_env_values() -> list[str]:
    """Values of the secret-named environment variables, longest first (so a value that contains another is
    masked whole)."""
    values = {v for k, v in os.environ.items() if is_secret_env(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_env_values() if secrets is None else secrets:
        text = text.replace(value, MASK)
    return _URI_CREDENTIALS_RE.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def _redact_value(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {
            k: MASK if is_secret_name(str(k)) and value[k] not in (None, "") else _redact_value(value[k], secrets)
            for k in value
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v, secrets) for v in value]
    return value


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, strings, numbers) with secret-named keys masked and secret values
    cut out of every string."""
    return _redact_value(obj, secret_env_values())


def _redact_json_text(value: Any, secrets: list[str]) -> Any:
    """A list or mapping logged as JSON text (to_flat_dict does that with lists) is masked inside."""
    if not isinstance(value, str) or not value.startswith(("[", "{")):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    masked = _redact_value(parsed, secrets)
    return value if masked == parsed else json.dumps(masked)


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{"a.b.api_key": value}`` parameters, masked the same way (JSON text values inside too)."""
    secrets = secret_env_values()
    return _redact_value({k: _redact_json_text(v, secrets) for k, v in params.items()}, secrets)
