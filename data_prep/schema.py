"""The one definition of a sample in a shard. Writers (curate, mix) and readers (train, evaluate) import it.

A sample is a group of tar members sharing a key, as webdataset reads them:

    {key}.jpg | {key}.png | {key}.webp   image bytes (at most one image field)
    {key}.txt                            caption or prompt, UTF-8
    {key}.json                           metadata (:class:`SampleMeta`), UTF-8 JSON with sorted keys
    {key}.vq.npy                         optional precomputed VQ ids (int16/int32), ``np.save`` format
    {key}.latent.npy                     optional precomputed VAE latent (float16/float32)

Keys contain no dots (webdataset splits member names at the first dot of the basename) and no path
separators; :func:`make_key` derives a stable key from the source name and the sample's key in its source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# What a sample is for. A source's kind maps to the task its samples carry; the mixer may re-use a caption
# sample for generation by setting its task to t2i (dense-caption text-to-image in Janus-Pro stage II).
TASKS: tuple[str, ...] = ("t2i", "caption", "chart_doc", "sft", "text", "class_label")
UNDERSTANDING_TASKS = frozenset({"caption", "chart_doc", "sft"})
GENERATION_TASKS = frozenset({"t2i", "class_label"})
TEXT_TASKS = frozenset({"text"})

SOURCE_KINDS: dict[str, str] = {
    "caption": "caption",
    "chart_doc": "chart_doc",
    "synthetic_aesthetic": "t2i",
    "text": "text",
    "class_label": "class_label",
    "sft_multimodal": "sft",
}
"""Source kind (curation config) -> the task its samples carry."""

IMAGE_EXTS: tuple[str, ...] = ("jpg", "png", "webp")
TEXT_EXT = "txt"
META_EXT = "json"
VQ_EXT = "vq.npy"
LATENT_EXT = "latent.npy"
KEY_FIELD = "__key__"
# Member order inside a sample, fixed so that shards are byte-reproducible.
MEMBER_ORDER: tuple[str, ...] = (*IMAGE_EXTS, TEXT_EXT, META_EXT, VQ_EXT, LATENT_EXT)
ROLES = ("system", "user", "assistant")
IMAGE_TAG = "<image>"
"""Stands for the sample's image inside a conversation turn."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_SLUG_RE = re.compile(r"[^A-Za-z0-9_]+")


class SchemaError(ValueError):
    """A sample that does not follow the shard schema."""


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SchemaError(f"invalid sample key {key!r}: use 1-200 characters of [A-Za-z0-9_-], no dots")
    return key


def make_key(source: str, source_key: str) -> str:
    """A stable key: readable slugs of source and source key plus a hash of both (so slugs may collide)."""
    digest = hashlib.blake2b(f"{source}\0{source_key}".encode(), digest_size=6).hexdigest()
    src = _SLUG_RE.sub("_", source).strip("_")[:40] or "src"
    sk = _SLUG_RE.sub("_", source_key).strip("_")[:60] or "x"
    return validate_key(f"{src}-{sk}-{digest}")


@dataclass
class Turn:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SchemaError(f"conversation role {self.role!r} is not one of {ROLES}")
        if not isinstance(self.content, str):
            raise SchemaError(f"conversation content must be text, got {type(self.content).__name__}")


@dataclass
class SampleMeta:
    source: str
    """Name of the source (curation config) the sample came from."""
    source_key: str
    """The sample's key or location inside its source."""
    task: str
    """One of TASKS."""
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    """SHA-256 of the stored image bytes (hex)."""
    phash: str | None = None
    """64-bit perceptual hash of the image (16 hex digits)."""
    label: int | None = None
    """Class index for class_label samples."""
    class_name: str | None = None
    conversation: list[Turn] = field(default_factory=list)
    """Question/answer turns for chart_doc and sft; the image appears as IMAGE_TAG in a turn."""
    scores: dict[str, float] = field(default_factory=dict)
    """Quality scores carried by the source or computed in curation (clip, aesthetic, watermark, nsfw...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a source carries (kept as JSON)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SchemaError(f"task {self.task!r} is not one of {TASKS}")
        self.conversation = [t if isinstance(t, Turn) else Turn(**t) for t in self.conversation]

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> SampleMeta:
        obj = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise SchemaError(f"unknown metadata fields {unknown}")
        return cls(**obj)


@dataclass
class Sample:
    key: str
    meta: SampleMeta
    image: bytes | None = None
    image_ext: str | None = None
    text: str | None = None
    vq: np.ndarray | None = None
    latent: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_key(self.key)
        if (self.image is None) != (self.image_ext is None):
            raise SchemaError(f"sample {self.key}: image and image_ext must be given together")
        if self.image_ext is not None and self.image_ext not in IMAGE_EXTS:
            raise SchemaError(f"sample {self.key}: image extension {self.image_ext!r} not in {IMAGE_EXTS}")
        if self.vq is not None and self.vq.dtype not in (np.int16, np.int32):
            raise SchemaError(f"sample {self.key}: vq ids must be int16 or int32, got {self.vq.dtype}")


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Sample -> ``{"__key__": key, ext: bytes}`` in MEMBER_ORDER (what the tar writer takes)."""
    out: dict[str, Any] = {KEY_FIELD: sample.key}
    if sample.image is not None:
        out[sample.image_ext] = bytes(sample.image)
    if sample.text is not None:
        out[TEXT_EXT] = sample.text.encode("utf-8")
    out[META_EXT] = sample.meta.to_json()
    if sample.vq is not None:
        out[VQ_EXT] = encode_npy(sample.vq)
    if sample.latent is not None:
        out[LATENT_EXT] = encode_npy(sample.latent)
    return out


def _as_bytes(value: Any, name: str, key: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise SchemaError(f"sample {key}: field {name!r} must be raw bytes, got {type(value).__name__}")


def decode_sample(record: Mapping[str, Any]) -> Sample:
    """A raw webdataset record (undecoded bytes per extension) -> Sample. Unknown fields are an error."""
    key = record.get(KEY_FIELD)
    if key is None:
        raise SchemaError(f"record has no {KEY_FIELD}: fields {sorted(record)}")
    # webdataset's key may carry the shard's directory; ours never has one.
    key = str(key).rsplit("/", 1)[-1]
    fields = {k: v for k, v in record.items() if not k.startswith("__")}
    unknown = sorted(set(fields) - set(MEMBER_ORDER))
    if unknown:
        raise SchemaError(f"sample {key}: unknown fields {unknown}")
    images = [ext for ext in IMAGE_EXTS if ext in fields]
    if len(images) > 1:
        raise SchemaError(f"sample {key}: more than one image field {images}")
    if META_EXT not in fields:
        raise SchemaError(f"sample {key}: no {META_EXT} metadata")
    meta = SampleMeta.from_json(_as_bytes(fields[META_EXT], META_EXT, key))
    text = fields.get(TEXT_EXT)
    return Sample(
        key=key,
        meta=meta,
        image=_as_bytes(fields[images[0]], images[0], key) if images else None,
        image_ext=images[0] if images else None,
        text=_as_bytes(text, TEXT_EXT, key).decode("utf-8") if text is not None else None,
        vq=decode_npy(_as_bytes(fields[VQ_EXT], VQ_EXT, key)) if VQ_EXT in fields else None,
        latent=decode_npy(_as_bytes(fields[LATENT_EXT], LATENT_EXT, key)) if LATENT_EXT in fields else None,
    )


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
