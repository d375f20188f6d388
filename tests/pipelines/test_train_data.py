"""A train recipe names the mixture it trains on; its stage shards are found where that mix recipe writes them,
unless an explicit data_root says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import load_config
from tests.data_prep.mix_fixtures import write_stage_folder
from training.config import TrainConfig
from training.stages import data_root, stage_shard_paths

REPO = Path(__file__).resolve().parents[2]


def _cfg(recipe: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "train" / recipe, ["tracking.backend=none", *overrides])


@pytest.mark.parametrize(
    ("recipe", "root"),
    [
        ("debug_janus_pro.yaml", "outputs/stages/toy_janus_pro"),
        ("debug_janusflow.yaml", "outputs/stages/toy_janusflow"),
    ],
)
def test_debug_recipes_train_on_their_mix_recipes_stages(recipe: str, root: str) -> None:
    assert data_root(_cfg(recipe)) == Path(root)


def test_an_explicit_data_root_wins_and_neither_means_the_default(tmp_path: Path) -> None:
    assert data_root(_cfg("debug_janus_pro.yaml", f"data_root={tmp_path}")) == tmp_path
    assert data_root(_cfg("debug_janus_pro.yaml", "mixture=''")) == Path("outputs/stages")


def test_stage_shards_are_found_under_the_mixtures_out_dir(tmp_path: Path) -> None:
    recipe = tmp_path / "mix_here.yaml"
    stages = {"stage1": {"samples": 4, "groups": {"text": {"ratio": 1, "sources": {"text": {}}}}}}
    recipe.write_text(json.dumps({"recipe": "here", "out_dir": str(tmp_path / "stages"), "stages": stages}))
    tars = write_stage_folder(tmp_path / "stages" / "here" / "stage1")
    cfg = _cfg("debug_janus_pro.yaml", f"mixture={recipe}", "stage.I.shards=stage1")
    assert stage_shard_paths(cfg, "I") == [t.resolve() for t in tars]
