"""Fixtures of the evaluate/generate tests: a small toy world and random-weight debug checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_prep.toyworld import SplitSizes, ToyWorldConfig, build_toyworld
from model.build import build_model
from model.flavors import get_flavor


def small_world(out: Path) -> Path:
    """All real digits (the judge needs them), few shapes and charts."""
    cfg = ToyWorldConfig(
        out_dir=str(out),
        sources=["digits", "shapes", "charts_docs"],
        shapes=SplitSizes(train=4, eval=12),
        charts_docs=SplitSizes(train=2, eval=6),
    )
    return build_toyworld(cfg, log=lambda _: None)


def make_checkpoint(out: Path, family: str) -> Path:
    """A stage's final/ folder as the trainer writes it, with random debug weights."""
    torch.manual_seed(0)
    model = build_model(get_flavor("debug"), family)
    final = out / f"debug_{family}-stage_I" / "final"
    final.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final / "model.safetensors"))
    info = {"stage": "I", "steps": 1, "family": family, "flavor": "debug"}
    (final / "stage_done.json").write_text(json.dumps(info))
    return final
