"""Curated sources for the mixer's tests, written in tmp_path in the curation job's output contract.

``{root}/{source}/{source}-00000N.tar`` (samples per data_prep.schema) and ``{root}/{source}/manifest.json``
written through data_prep.manifests.CuratedManifest, as curation writes it.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.manifests import MANIFEST_NAME, CuratedManifest, CuratedShard, StageManifest, StageShard
from data_prep.schema import SCHEMA_VERSION, Sample, SampleMeta, Turn, encode_sample, make_key
from data_prep.shards import shard_name, write_tar
from data_prep.stage_shards import finalize_manifest

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
            CuratedShard(name=path.name, samples=count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    CuratedManifest(
        source=name,
        kind=kind,
        task=KIND_TASK[kind],
        format="webdataset",
        path=str(folder),
        schema_version=SCHEMA_VERSION,
        inputs=n,
        kept=n,
        rejected=0,
        rejects_by_reason={},
        bytes=sum(s.bytes for s in shards),
        shards=shards,
        config_hash="fixture",
    ).write(folder / MANIFEST_NAME)
    return folder


def write_toy_curated(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """The toy world's curated sources (small), as the shipped toy recipes expect them."""
    for name, (kind, n) in TOY_SOURCES.items():
        write_source(root, name, kind, (sizes or {}).get(name, n))
    return root


def write_stage_folder(folder: Path, samples: int = 4, names: tuple[str, ...] = ("a.tar", "b.tar")) -> list[Path]:
    """Placeholder stage shards (not real tars) and a real stage manifest saying ``samples``: for tests of what
    reads a stage folder without training on it."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for name in names:
        (folder / name).write_bytes(b"x" * 1024)
        shards.append(StageShard(name=name, samples=samples // len(names), counts={"text": samples // len(names)}))
    manifest = StageManifest(
        recipe="fixture",
        stage=folder.name,
        config_hash="fixture",
        seed=0,
        samples=samples,
        samples_per_shard=max(1, samples // len(names)),
        shuffle_window=1,
        groups={},
        phases=[],
        target_ratios={"text": 1.0},
        realised_ratios={"text": 1.0},
        worst_shard={},
        caption_first_sentence={"chosen": 0, "truncated": 0, "fraction": 0.0},
        source_manifests={},
        shards=shards,
    )
    finalize_manifest(folder, manifest)
    return sorted(folder.glob("*.tar"))
