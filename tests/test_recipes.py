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
