"""The toy world: small, real or exactly-labelled sources in the input formats curation reads.

``build_toyworld(cfg)`` writes, under ``cfg.out_dir``, one folder per source with a ``train/`` and an
``eval/`` split (the evaluation split is fixed by the seed and never overlaps training):

    digits/{split}/manifest.jsonl + images/*.png  real handwritten digits (sklearn)   class_label, jsonl
    shapes/{split}/NNNNNN.png + .txt + .json      shapes with exact captions          synthetic_aesthetic, image_folder
    charts_docs/{split}/charts_docs-000000.tar    charts and documents with Q&A       chart_doc, webdataset
    digits_qa/{split}/digits_qa-000000.tar        the digits, "What digit is this?"   sft_multimodal, webdataset
    shapes_qa/{split}/shapes_qa-000000.tar        the shapes, colour/shape/count Q&A  sft_multimodal, webdataset
    photos/{split}/photos.parquet                 scikit-image photos + captions      caption, parquet (inline bytes)
    text/{split}/text.jsonl                       templated text                      text, jsonl
    toyworld.json                                 counts, files and their SHA-256

``digits_qa`` and ``shapes_qa`` ask about the very images of ``digits`` and ``shapes`` (same split, same
pixels), so digits and shapes are understood as well as generated. Same config and seed -> byte-identical
files. Nothing is downloaded: digits ship with scikit-learn, photographs with scikit-image, captions for them
with this package (assets/photos.json).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.io import atomic_write_json, file_sha256
from data_prep import toy_render
from data_prep.schema import IMAGE_TAG
from data_prep.shards import write_tar

logger = logging.getLogger("data_prep.toyworld")

SPLITS = ("train", "eval")
SOURCES = ("digits", "shapes", "charts_docs", "photos", "text", "digits_qa", "shapes_qa")
DIGIT_QUESTION = "What digit is this?"
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
COUNT_QUESTION = "How many shapes are there?"
ASSETS = Path(__file__).parent / "assets"


@dataclass(kw_only=True)
class SplitSizes:
    train: int
    """Samples in the training split."""
    eval: int
    """Samples in the held-out evaluation split."""

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _sizes(train: int, eval: int) -> Any:
    return field(default_factory=lambda: SplitSizes(train=train, eval=eval))


@dataclass(kw_only=True)
class ToyWorldConfig:
    out_dir: str = "outputs/toyworld"
    """Where the sources are written (replaced source by source)."""
    seed: int = 0
    """Seeds every random choice; the eval split is fixed by it."""
    image_size: int = 64
    """Side of digit and shape images (pixels)."""
    chart_size: int = 128
    """Side of chart and document images (pixels)."""
    photo_size: int = 128
    """Side of the square photograph crops (pixels)."""
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    """Which sources to write."""
    digits_eval_fraction: float = 0.1
    """Fraction of the 1,797 sklearn digits held out for evaluation."""
    digits_max: int | None = None
    """Use at most this many digits (all 1,797 when None)."""
    shapes: SplitSizes = _sizes(2000, 200)
    """Shape images per split."""
    shapes_max_count: int = 3
    """At most this many shapes in one image."""
    charts_docs: SplitSizes = _sizes(2400, 500)
    """Chart/document images per split. Train: the demo's mixes draw about 2,000 chart/document samples either
    way; from 600 images (about 90 distinct examples of each comparison question) both families answered "items
    listed" and "up or down" at chance; from 2,400 both answer "items listed" 100% of the time and Janus-Pro "up or
    down" 0.79-0.98, while titles fall (README). Eval: 865 questions, at most 100 per type asked; 100 images gave
    12-58 answers per type, where one answer moved a type's accuracy by up to 0.08."""
    photos: SplitSizes = _sizes(200, 40)
    """Photograph crops per split (spread over the bundled photographs)."""
    text: SplitSizes = _sizes(1000, 100)
    """Text-only samples per split."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"sources: unknown {unknown}; valid: {list(SOURCES)}")
        if not 0.0 < self.digits_eval_fraction < 1.0:
            raise ValueError(f"digits_eval_fraction must be in (0, 1), got {self.digits_eval_fraction}")
        for name in ("image_size", "chart_size", "photo_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8 pixels, got {getattr(self, name)}")
        if not 1 <= self.shapes_max_count <= 5:
            raise ValueError(f"shapes_max_count must be in 1..5, got {self.shapes_max_count}")


def _rng(seed: int, source: str, split: str) -> np.random.Generator:
    """An independent stream per (seed, source, split): changing one source's size moves no other."""
    tag = int.from_bytes(hashlib.sha256(f"{source}/{split}".encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    _write_bytes(path, text.encode("utf-8"))


def _conversation(qas: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (q, a) in enumerate(qas):
        content = f"{IMAGE_TAG}\n{q}" if i == 0 else q
        turns += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return turns


def _digit_splits(cfg: ToyWorldConfig) -> tuple[Any, dict[str, list[int]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if cfg.digits_max is None else min(cfg.digits_max, len(digits.target))
    order = _rng(cfg.seed, "digits", "split").permutation(len(digits.target))[:n]
    n_eval = max(1, round(n * cfg.digits_eval_fraction))
    return digits, {"eval": sorted(order[:n_eval].tolist()), "train": sorted(order[n_eval:].tolist())}


def write_digits(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    digits, parts = _digit_splits(cfg)
    counts = {}
    for split, indices in parts.items():
        rows = []
        for idx in indices:
            label = int(digits.target[idx])
            name = f"images/{idx:05d}.png"
            img = toy_render.render_digit(digits.data[idx], cfg.image_size)
            _write_bytes(root / split / name, toy_render.encode_image(img, "png"))
            rows.append(
                {
                    "id": f"digit-{idx:05d}",
                    "image": name,
                    "label": label,
                    "class_name": str(label),
                    "prompt": f"a handwritten digit {label}",
                    "sklearn_index": idx,
                }
            )
        _write_jsonl(root / split / "manifest.jsonl", rows)
        counts[split] = len(rows)
    return counts


def _qa_record(key: str, img: Image.Image, meta: dict[str, Any], qas: list[tuple[str, str]]) -> dict[str, Any]:
    meta = {**meta, "conversation": _conversation(qas)}
    return {
        "__key__": key,
        "png": toy_render.encode_image(img, "png"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def write_digits_qa(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    """The digits of each split (same indices and pixels as ``digits/``), asked which digit they show."""
    digits, parts = _digit_splits(cfg)
    counts = {}
    for split, indices in parts.items():
        records = []
        for idx in indices:
            label = int(digits.target[idx])
            img = toy_render.render_digit(digits.data[idx], cfg.image_size)
            meta = {"label": label, "sklearn_index": idx}
            records.append(_qa_record(f"{split}_{idx:05d}", img, meta, [(DIGIT_QUESTION, str(label))]))
        (root / split).mkdir(parents=True, exist_ok=True)
        write_tar(root / split / "digits_qa-000000.tar", records)
        counts[split] = len(records)
    return counts


def write_shapes(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        rng = _rng(cfg.seed, "shapes", split)
        n = getattr(cfg.shapes, split)
        for i in range(n):
            img, facts = toy_render.render_shapes(rng, cfg.image_size, cfg.shapes_max_count)
            stem = root / split / f"{i:06d}"
            _write_bytes(stem.with_suffix(".png"), toy_render.encode_image(img, "png"))
            _write_bytes(stem.with_suffix(".txt"), facts["caption"].encode("utf-8"))
            _write_bytes(stem.with_suffix(".json"), json.dumps(facts, sort_keys=True).encode("utf-8"))
        counts[split] = n
    return counts


def write_shapes_qa(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    """The shapes of each split (the same random stream, so the same pixels as ``shapes/``) with questions
    about their colour, kind and count, in a seeded order per image (a fixed order would let a model answer
    by the turn's position instead of the question)."""
    counts = {}
    for split in SPLITS:
        rng = _rng(cfg.seed, "shapes", split)
        order_rng = _rng(cfg.seed, "shapes_qa", split)
        records = []
        for i in range(getattr(cfg.shapes, split)):
            img, facts = toy_render.render_shapes(rng, cfg.image_size, cfg.shapes_max_count)
            qas = [
                (COLOUR_QUESTION, facts["color"]),
                (SHAPE_QUESTION, facts["shape"]),
                (COUNT_QUESTION, str(facts["count"])),
            ]
            qas = [qas[k] for k in order_rng.permutation(len(qas))]
            records.append(_qa_record(f"{split}_{i:06d}", img, facts, qas))
        (root / split).mkdir(parents=True, exist_ok=True)
        write_tar(root / split / "shapes_qa-000000.tar", records)
        counts[split] = len(records)
    return counts


def write_charts_docs(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        rng = _rng(cfg.seed, "charts_docs", split)
        n = getattr(cfg.charts_docs, split)
        records = []
        for i in range(n):
            render = toy_render.render_chart if rng.random() < 0.7 else toy_render.render_document
            img, facts = render(rng, cfg.chart_size)
            qas = facts.pop("qas")
            # Ask a seeded subset of the questions, in a seeded order.
            keep = rng.permutation(len(qas))[: int(rng.integers(1, len(qas) + 1))]
            meta = {**facts, "conversation": _conversation([tuple(qas[k]) for k in sorted(keep)])}
            records.append(
                {
                    "__key__": f"{split}_{i:06d}",
                    "png": toy_render.encode_image(img, "png"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
        (root / split).mkdir(parents=True, exist_ok=True)
        write_tar(root / split / "charts_docs-000000.tar", records)
        counts[split] = n
    return counts


def _load_photos() -> list[tuple[str, str, Image.Image]]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    spec = json.loads((ASSETS / "photos.json").read_text())["photos"]
    out = []
    for item in spec:
        path = folder / item["file"]
        if path.is_file():  # a scikit-image release without this file just contributes fewer photos
            with Image.open(path) as im:
                out.append((item["file"], item["caption"], im.convert("RGB")))
    if not out:
        raise FileNotFoundError(f"no bundled scikit-image photographs found in {folder}")
    return out


def write_photos(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    photos = _load_photos()
    counts = {}
    for split in SPLITS:
        rng = _rng(cfg.seed, "photos", split)
        n = getattr(cfg.photos, split)
        rows: dict[str, list[Any]] = {"key": [], "image": [], "caption": [], "photo": []}
        for i in range(n):
            name, caption, img = photos[i % len(photos)]
            w, h = img.size
            side = int(min(w, h) * rng.uniform(0.45, 0.8))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((cfg.photo_size,) * 2, Image.Resampling.LANCZOS)
            rows["key"].append(f"{split}_{i:06d}")
            rows["image"].append(toy_render.encode_image(crop, "jpg"))
            rows["caption"].append(caption)
            rows["photo"].append(name)
        table = pa.table({k: pa.array(v, type=pa.binary() if k == "image" else pa.string()) for k, v in rows.items()})
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / split / "photos.parquet", compression="zstd")
        counts[split] = n
    return counts


def write_text(cfg: ToyWorldConfig, root: Path) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        rng = _rng(cfg.seed, "text", split)
        n = getattr(cfg.text, split)
        rows = [{"id": f"{split}_{i:06d}", **toy_render.render_text(rng)} for i in range(n)]
        _write_jsonl(root / split / "text.jsonl", rows)
        counts[split] = n
    return counts


WRITERS: dict[str, Callable[[ToyWorldConfig, Path], dict[str, int]]] = {
    "digits": write_digits,
    "shapes": write_shapes,
    "charts_docs": write_charts_docs,
    "photos": write_photos,
    "text": write_text,
    "digits_qa": write_digits_qa,
    "shapes_qa": write_shapes_qa,
}
SOURCE_SPECS: dict[str, dict[str, str]] = {
    "digits": {"kind": "class_label", "format": "jsonl"},
    "shapes": {"kind": "synthetic_aesthetic", "format": "image_folder"},
    "charts_docs": {"kind": "chart_doc", "format": "webdataset"},
    "photos": {"kind": "caption", "format": "parquet"},
    "text": {"kind": "text", "format": "jsonl"},
    "digits_qa": {"kind": "sft_multimodal", "format": "webdataset"},
    "shapes_qa": {"kind": "sft_multimodal", "format": "webdataset"},
}


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def build_toyworld(cfg: ToyWorldConfig, log: Callable[[str], None] | None = None) -> Path:
    """Write every configured source (each replaced atomically) and ``toyworld.json``; returns out_dir. A line
    per source goes to ``log`` (default: this module's logger)."""
    log = log or logger.info
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": cfg.seed, "sources": {}}
    for name in cfg.sources:
        partial = out / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        counts = WRITERS[name](cfg, partial)
        final = out / name
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        hashes = _file_hashes(final)
        summary["sources"][name] = {
            **SOURCE_SPECS[name],
            "counts": counts,
            "files": len(hashes),
            "sha256": hashlib.sha256(json.dumps(hashes).encode()).hexdigest(),
        }
        log(f"toyworld: {name:<12} train={counts['train']:<6} eval={counts['eval']:<6} -> {final}")
    atomic_write_json(out / "toyworld.json", summary)
    return out
