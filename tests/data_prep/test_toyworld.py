"""The toy world: deterministic, in the formats curation reads, labels that agree with the pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from skimage.measure import label as connected_components

from data_prep.toy_render import COLORS
from data_prep.toyworld import SplitSizes, ToyWorldConfig, build_toyworld

REPO = Path(__file__).resolve().parents[2]


def _small(out: Path, seed: int = 0) -> ToyWorldConfig:
    return ToyWorldConfig(
        out_dir=str(out),
        seed=seed,
        digits_max=60,
        shapes=SplitSizes(train=24, eval=8),
        charts_docs=SplitSizes(train=8, eval=4),
        photos=SplitSizes(train=6, eval=3),
        text=SplitSizes(train=20, eval=5),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toyworld(_small(tmp_path_factory.mktemp("toy") / "w"), log=lambda _: None)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(world: Path, tmp_path: Path) -> None:
    again = build_toyworld(_small(tmp_path / "again"), log=lambda _: None)
    assert _files(world) == _files(again)
    other = build_toyworld(_small(tmp_path / "other", seed=1), log=lambda _: None)
    assert _files(other)["shapes/train/000000.png"] != _files(world)["shapes/train/000000.png"]


def test_digits_jsonl_manifest_with_real_digits(world: Path) -> None:
    splits = {}
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (world / "digits" / split / "manifest.jsonl").read_text().splitlines()]
        for row in rows:
            img = Image.open(world / "digits" / split / row["image"])
            assert img.size == (64, 64) and img.mode == "RGB"
            assert row["prompt"] == f"a handwritten digit {row['label']}" and 0 <= row["label"] <= 9
        splits[split] = {r["sklearn_index"] for r in rows}
    assert len(splits["train"]) + len(splits["eval"]) == 60
    assert not splits["train"] & splits["eval"], "evaluation digits leaked into training"


def test_shapes_captions_match_pixels(world: Path) -> None:
    folder = world / "shapes" / "train"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 24
    for png in pngs:
        caption = png.with_suffix(".txt").read_text()
        facts = json.loads(png.with_suffix(".json").read_text())
        assert facts["caption"] == caption and facts["color"] in caption and facts["shape"] in caption
        pixels = np.asarray(Image.open(png), dtype=np.int32)
        ink = np.abs(pixels - 255).sum(-1) > 150
        assert connected_components(ink, connectivity=2).max() == facts["count"], caption
        mean = pixels[ink].mean(0)
        nearest = min(COLORS, key=lambda c: float(np.sum((np.array(COLORS[c]) - mean) ** 2)))
        assert nearest == facts["color"], caption


def test_charts_docs_webdataset_with_qa(world: Path) -> None:
    records = list(wds.WebDataset(str(world / "charts_docs" / "train" / "charts_docs-000000.tar"), shardshuffle=False))
    assert len(records) == 8
    for rec in records:
        assert Image.open(io.BytesIO(rec["png"])).size == (128, 128)
        conv = json.loads(rec["json"])["conversation"]
        assert conv[0]["role"] == "user" and conv[0]["content"].startswith("<image>\n")
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(t["content"] for t in conv)


def test_photos_parquet_inline_bytes_and_text(world: Path) -> None:
    table = pq.read_table(world / "photos" / "eval" / "photos.parquet")
    assert table.num_rows == 3 and set(table.column_names) == {"key", "image", "caption", "photo"}
    img = Image.open(io.BytesIO(table.column("image")[0].as_py()))
    assert img.format == "JPEG" and img.size == (128, 128)
    rows = [json.loads(x) for x in (world / "text" / "train" / "text.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["text"].strip() for r in rows)
    summary = json.loads((world / "toyworld.json").read_text())
    assert summary["sources"]["photos"]["counts"] == {"train": 6, "eval": 3}


def test_job_cli_writes_resolved_config_and_rejects_bad_key(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "pipelines.toyworld", "--config", str(REPO / "configs/data/toyworld.yaml")]
    bad = subprocess.run([*args, "shapes.trian=3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "shapes.trian" in bad.stderr
    out = tmp_path / "cli"
    small = [
        "digits_max=20",
        "shapes.train=2",
        "shapes.eval=1",
        "charts_docs.train=1",
        "charts_docs.eval=1",
        "photos.train=1",
        "photos.eval=1",
        "text.train=1",
        "text.eval=1",
    ]
    ok = subprocess.run([*args, f"out_dir={out}", *small], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert str(out) in ok.stderr and (out / "config.resolved.yaml").is_file()  # the job logs where it wrote
    assert "shapes:\n  train: 2" in (out / "config.resolved.yaml").read_text()


def test_digits_and_shapes_qa_ask_about_the_same_pixels(world: Path) -> None:
    for split in ("train", "eval"):
        digits = {
            r["sklearn_index"]: r
            for r in map(json.loads, (world / "digits" / split / "manifest.jsonl").read_text().splitlines())
        }
        qa = list(wds.WebDataset(str(world / "digits_qa" / split / "digits_qa-000000.tar"), shardshuffle=False))
        assert len(qa) == len(digits)
        for sample in qa:
            meta = json.loads(sample["json"])
            row = digits[meta["sklearn_index"]]
            assert sample["png"] == (world / "digits" / split / row["image"]).read_bytes()
            turns = meta["conversation"]
            assert turns[0]["content"].endswith("What digit is this?") and turns[1]["content"] == str(row["label"])
        shapes = list(wds.WebDataset(str(world / "shapes_qa" / split / "shapes_qa-000000.tar"), shardshuffle=False))
        assert len(shapes) == len(list((world / "shapes" / split).glob("*.png")))
        first_questions = set()
        for i, sample in enumerate(shapes):
            facts = json.loads((world / "shapes" / split / f"{i:06d}.json").read_text())
            assert sample["png"] == (world / "shapes" / split / f"{i:06d}.png").read_bytes()
            turns = json.loads(sample["json"])["conversation"]
            expected = {
                "What colour is the shape?": facts["color"],
                "What shape is it?": facts["shape"],
                "How many shapes are there?": str(facts["count"]),
            }
            asked = {q["content"].split("\n")[-1]: a["content"] for q, a in zip(turns[0::2], turns[1::2], strict=True)}
            assert asked == expected and turns[0]["content"].startswith("<image>\n")
            first_questions.add(turns[0]["content"])
        if len(shapes) >= 10:  # the order varies, so no answer can be told by its turn's position
            assert len(first_questions) == 3
