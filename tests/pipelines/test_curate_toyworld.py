"""The shipped toy recipe curates a (small) toy world: every source kept, read back as the mixer will."""

import json
from pathlib import Path

import pytest

from common.config import load_config
from data_prep.curation import CurateConfig, run_curation
from data_prep.toyworld import SplitSizes, ToyWorldConfig, build_toyworld
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401
from tests.data_prep.dedup_reference import assert_job_agrees_with_reference

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "data" / "curate_toyworld.yaml"


@pytest.mark.ray
def test_toy_recipe_curates_toy_world(tmp_path, ray_local):  # noqa: F811
    world = build_toyworld(
        ToyWorldConfig(
            out_dir=str(tmp_path / "toyworld"),
            digits_max=60,
            shapes=SplitSizes(train=24, eval=4),
            charts_docs=SplitSizes(train=12, eval=4),
            photos=SplitSizes(train=10, eval=4),
            text=SplitSizes(train=20, eval=4),
        ),
        log=lambda _: None,
    )
    cfg = load_config(
        CurateConfig, RECIPE, [f"out_dir={tmp_path / 'curated'}", "exec.progress=false", "tracking.backend=none"]
    )
    for src in cfg.sources:
        src.path = src.path.replace("outputs/toyworld", str(world))
        assert "/train" in src.path  # the recipe curates the train splits
    results = {r["source"]: r for r in run_curation(cfg)}
    assert set(results) == {"digits", "shapes", "charts_docs", "photos", "text", "digits_qa", "shapes_qa"}
    for name, r in results.items():
        assert r["kept"] > 0 and r["inputs"] == r["kept"] + r["rejected"], name
        manifest = json.loads((tmp_path / "curated" / name / "manifest.json").read_text())
        assert (
            manifest["task"]
            == {
                "digits": "class_label",
                "shapes": "t2i",
                "charts_docs": "chart_doc",
                "photos": "caption",
                "text": "text",
                "digits_qa": "sft",
                "shapes_qa": "sft",
            }[name]
        )
    # synthetic sources opt out of dedup and pass the lowered size filters whole
    assert results["shapes"]["rejected"] == 0 and results["charts_docs"]["rejected"] == 0
    # the question sources show the same images as digits/shapes, so they opt out of dedup and keep every one
    assert results["digits_qa"]["rejected"] == 0 and results["shapes_qa"]["rejected"] == 0
    assert results["shapes_qa"]["kept"] == 24


@pytest.mark.ray
def test_every_source_deduplicated_agrees_with_the_reference(tmp_path, ray_local):  # noqa: F811
    """All toy sources in dedup: look-alike drawn shapes and the question sources' copies of the same images
    make long near-duplicate chains across sources; the distributed dedup must drop exactly what the
    single-pass reference drops."""
    world = build_toyworld(
        ToyWorldConfig(
            out_dir=str(tmp_path / "toyworld"),
            digits_max=60,
            shapes=SplitSizes(train=60, eval=4),
            charts_docs=SplitSizes(train=20, eval=4),
            photos=SplitSizes(train=10, eval=4),
            text=SplitSizes(train=40, eval=4),
        ),
        log=lambda _: None,
    )
    cfg = load_config(
        CurateConfig,
        RECIPE,
        [f"out_dir={tmp_path / 'curated'}", "exec.progress=false", "tracking.backend=none", "exec.keep_work=true"],
    )
    for src in cfg.sources:
        src.path = src.path.replace("outputs/toyworld", str(world))
        src.dedup = True
    results = {r["source"]: r for r in run_curation(cfg)}
    dropped = assert_job_agrees_with_reference(cfg, tmp_path / "curated")
    near = sum(r["rejects_by_reason"].get("duplicate_near", 0) for r in results.values())
    assert near >= 5 and dropped > near
