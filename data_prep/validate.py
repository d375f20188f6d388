"""Field mapping and type checks: a raw record's fields -> the sample's text, label, turns, scores, extra.

Raises :class:`~data_prep.imaging.Rejected` with a named reason (bad_column_type, empty_text,
non_utf8_text, missing_label, empty_conversation) instead of letting a bad value through.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from data_prep.imaging import Rejected
from data_prep.readers import RawRecord, pick_field
from data_prep.schema import IMAGE_TAG, Turn
from data_prep.sources import SourceConfig

TEXT_CANDIDATES = ("caption", "text", "txt", "prompt")
LABEL_CANDIDATES = ("label", "cls")
CONVERSATION_CANDIDATES = ("conversation", "conversations")
TEXT_REQUIRED_KINDS = frozenset({"caption", "synthetic_aesthetic", "text"})
CONVERSATION_KINDS = frozenset({"chart_doc", "sft_multimodal"})
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Fields:
    """A sample's mapped, type-checked fields."""

    text: str | None = None
    label: int | None = None
    class_name: str | None = None
    conversation: list[Turn] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def as_text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("non_utf8_text", f"{name}: {exc}") from None
    if not isinstance(value, str):
        raise Rejected("bad_column_type", f"{name} has type {type(value).__name__}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes
        raise Rejected("non_utf8_text", f"{name}: {exc}") from None
    return value


def as_label(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | str):
        text = as_text(value, name) or ""
        if text.strip().lstrip("-").isdigit():
            return int(text.strip())
        raise Rejected("bad_column_type", f"{name} {text[:40]!r} is not an integer")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise Rejected("bad_column_type", f"{name} has type {type(value).__name__}, expected int")


def as_conversation(value: Any, name: str) -> list[Turn]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Rejected("bad_column_type", f"{name} is text that is not a JSON list") from None
    if not isinstance(value, list):
        raise Rejected("bad_column_type", f"{name} has type {type(value).__name__}, expected a list")
    turns = []
    for item in value:
        if not isinstance(item, dict):
            raise Rejected("bad_column_type", f"{name} turn has type {type(item).__name__}")
        role = _ROLE_ALIASES.get(str(item.get("role", item.get("from", ""))))
        content = item.get("content", item.get("value"))
        if role is None or not isinstance(content, str):
            raise Rejected("bad_column_type", f"{name} turn {sorted(item)} lacks a role or text content")
        turns.append(Turn(role=role, content=as_text(content, name) or ""))
    return turns


def _scores(row: dict[str, Any], src: SourceConfig) -> dict[str, float]:
    scores = {}
    for name, col in sorted(src.score_fields.items()):
        value = row.get(col)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Rejected("bad_column_type", f"score {col!r} has type {type(value).__name__}")
        if math.isfinite(value):
            scores[name] = float(value)
    return scores


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _tag_image(turns: list[Turn]) -> list[Turn]:
    """Make sure the image appears in the conversation: prefix the first user turn with IMAGE_TAG."""
    if not turns or any(IMAGE_TAG in t.content for t in turns):
        return turns
    first = next((i for i, t in enumerate(turns) if t.role == "user"), 0)
    turns[first] = Turn(role=turns[first].role, content=f"{IMAGE_TAG}\n{turns[first].content}")
    return turns


def map_fields(rec: RawRecord, src: SourceConfig) -> Fields:
    row = rec.row
    cols = {
        "text": pick_field(row, src.text_field, TEXT_CANDIDATES),
        "label": pick_field(row, src.label_field, LABEL_CANDIDATES),
        "class_name": pick_field(row, src.class_name_field, ("class_name",)),
        "conversation": pick_field(row, src.conversation_field, CONVERSATION_CANDIDATES),
    }
    out = Fields()
    text = as_text(row.get(cols["text"]) if cols["text"] else None, cols["text"] or "text")
    out.text = text if text is not None and text.strip() else None
    if src.kind in TEXT_REQUIRED_KINDS and out.text is None:
        raise Rejected("empty_text", f"field {cols['text'] or '/'.join(TEXT_CANDIDATES)!r} is empty or missing")
    out.label = as_label(row.get(cols["label"]) if cols["label"] else None, cols["label"] or "label")
    if src.kind == "class_label" and out.label is None:
        raise Rejected("missing_label", "no integer label")
    out.class_name = as_text(row.get(cols["class_name"]) if cols["class_name"] else None, "class_name")
    if out.class_name is None and out.label is not None and rec.class_names:
        out.class_name = rec.class_names[out.label] if 0 <= out.label < len(rec.class_names) else None
    conv = row.get(cols["conversation"]) if cols["conversation"] else None
    out.conversation = as_conversation(conv, cols["conversation"] or "conversation")
    if src.kind in CONVERSATION_KINDS and not out.conversation:
        raise Rejected("empty_conversation", "no question/answer turns")
    if src.has_images:
        out.conversation = _tag_image(out.conversation)
    out.scores = _scores(row, src)
    used = {c for c in cols.values() if c} | set(src.score_fields.values())
    out.extra = {k: v for k, v in sorted(row.items()) if k not in used and not k.startswith("__") and _jsonable(v)}
    return out
