"""Curated sources for the mixer's tests, written in tmp_path in the curation job's output contract.

``{root}/{source}/{source}-00000N.tar`` (samples per data_prep.schema) and ``{root}/{source}/manifest.json``
with the fields pipelines.curate writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.schema import Sample, SampleMeta, Turn, encode_sample, make_key
from data_prep.shards import shard_name, write_tar

KIND_TASK = {
    "class_label": "class_label",
    "synthetic_aesthetic": "t2i",
    "chart_doc": "chart_doc",
    "caption": "caption",
    "text": "text",
    "sft_multimodal": "sft",
}
TOY_SOURCES = {
    "digits": ("class_label", 60),
    "shapes": ("synthetic_aesthetic", 80),
    "digits_qa": ("sft_multimodal", 40),
    "shapes_qa": ("sft_multimodal", 40),
    "charts_docs": ("chart_doc", 50),
    "photos": ("caption", 30),
    "text": ("text", 70),
}
"""The toy world's curated source names, kinds and (small) sizes."""


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_sample(source: str, kind: str, i: int) -> Sample:
    task = KIND_TASK[kind]
    key = make_key(source, f"item{i}")
    if task == "text":
        return Sample(
            key=key,
            meta=SampleMeta(source=source, source_key=f"item{i}", task=task),
            text=f"Text number {i}. It has two sentences.",
        )
    image = png(zlib.crc32(source.encode()) % 1000 * 10_000 + i)
    meta = SampleMeta(source=source, source_key=f"item{i}", task=task, width=20, height=16)
    if task == "class_label":
        meta.label, meta.class_name = i % 10, f"digit {i % 10}"
    if task in ("chart_doc", "sft"):
        meta.conversation = [Turn("user", "<image> What is shown?"), Turn("assistant", f"Item {i}.")]
    return Sample(
        key=key,
        meta=meta,
        image=image,
        image_ext="png",
        text=f"A picture of item {i} from {source}. It is drawn on a plain background.",
    )


def write_source(root: Path, name: str, kind: str, n: int, per_shard: int = 25) -> Path:
    """One curated source of n samples in shards of ``per_shard``; returns its folder."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    samples = [make_sample(name, kind, i) for i in range(n)]
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = folder / shard_name(name, s)
        count = write_tar(path, (encode_sample(x) for x in samples[start : start + per_shard]))
        data = path.read_bytes()
        shards.append(
            {"name": path.name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    manifest = {
        "source": name,
        "kind": kind,
        "task": KIND_TASK[kind],
        "format": "webdataset",
        "schema_version": 1,
        "inputs": n,
        "kept": n,
        "rejected": 0,
        "rejects_by_reason": {},
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "config_hash": "fixture",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return folder


def write_toy_curated(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """The toy world's curated sources (small), as the shipped toy recipes expect them."""
    for name, (kind, n) in TOY_SOURCES.items():
        write_source(root, name, kind, (sizes or {}).get(name, n))
    return root
