"""Stage previews: fixed prompts' images and fixed questions' answers, written as PNG + JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.build import build_model
from model.flavors import get_flavor
from model.tokenizer import build_debug_tokenizer
from training.outputs import PreviewConfig, run_previews


@pytest.mark.parametrize("questions", [["What colour is the shape?"], []])
def test_previews_write_grid_and_answers(questions: list[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    flavor = get_flavor("debug")
    model = build_model(flavor, "janus_pro").eval()
    cfg = PreviewConfig(
        prompts=["a handwritten digit 3", "a red circle in the center"], questions=questions, max_new_tokens=2
    )
    with torch.no_grad():
        paths = run_previews(model, flavor, "janus_pro", None, build_debug_tokenizer(), cfg, tmp_path, step=7)
    assert paths["grid"].name == "preview_step0000007.png"
    assert Image.open(paths["grid"]).size[0] >= 2 * flavor.vq.image_size  # one tile per prompt
    record = json.loads(paths["answers"].read_text())
    assert record["step"] == 7 and record["prompts"] == cfg.prompts
    assert [(a["prompt"], a["question"]) for a in record["answers"]] == [(p, q) for p in cfg.prompts for q in questions]
