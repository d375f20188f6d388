"""Every shipped recipe under configs/ loads into its job's config schema (litgpt's test_config_hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from pipelines.__main__ import job_module, recipe_job

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_recipes() -> None:
    assert (CONFIGS / "data" / "toyworld.yaml") in RECIPES and (CONFIGS / "demo.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads(path: Path) -> None:
    schema = job_module(recipe_job(path)).CONFIG
    cfg = load_config(schema, path)
    assert isinstance(cfg, schema)


def test_demo_builds_the_toy_world_its_recipe_describes() -> None:
    """The demo's toy world comes from ``ToyWorldConfig``'s defaults; ``configs/data/toyworld.yaml`` is what the
    ``toyworld`` job and the README describe. A size changed in one place only would make the demo train on a
    different world from the one the recipe shows."""
    from data_prep.toyworld import ToyWorldConfig
    from pipelines.demo import DemoConfig

    recipe = load_config(ToyWorldConfig, CONFIGS / "data" / "toyworld.yaml")
    demo = load_config(DemoConfig, CONFIGS / "demo.yaml").toyworld
    assert demo == recipe, f"configs/data/toyworld.yaml and ToyWorldConfig's defaults differ: {recipe} != {demo}"
