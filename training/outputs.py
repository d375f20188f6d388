"""What a training stage shows and leaves behind besides checkpoints: preview images and answers from fixed
prompts, and the exported model (HF Janus-Pro format / JanusFlow reference layout), both to MLflow.

Previews and exports run on rank 0 on an unsharded copy built from the gathered full weights, so the
sharded training model is never touched.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.tracking import Tracker
from model.build import build_model
from model.flavors import FlavorConfig
from model.inference import image_grid, to_pil

PREVIEW_COLUMNS = 4


@dataclass(kw_only=True)
class PreviewConfig:
    prompts: list[str] = field(
        default_factory=lambda: [
            "a handwritten digit 3", "a handwritten digit 7", "a red circle in the center", "two blue squares",
        ]
    )  # fmt: skip
    """Fixed text-to-image prompts whose images are generated at every preview."""
    questions: list[str] = field(default_factory=lambda: ["What is in the image?", "What colour is the shape?"])
    """Fixed questions asked about each generated image (understanding preview)."""
    seed: int = 0
    """Sampling seed, fixed so previews are comparable across steps."""
    max_new_tokens: int = 16
    """Longest answer."""


def unsharded_model(flavor: FlavorConfig, family: str, weights: dict[str, torch.Tensor], device: torch.device):
    model = build_model(flavor, family)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def run_previews(
    model: Any,
    flavor: FlavorConfig,
    family: str,
    vae: Any,
    tokenizer: Any,
    cfg: PreviewConfig,
    out_dir: Path,
    step: int,
) -> dict[str, Any]:
    """Generate the fixed prompts' images and answer the fixed questions about them; write PNG + JSON."""
    from model.family import get_family
    from model.sampling import answer_questions
    from model.tokenizer import special_ids

    special = special_ids(tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # a sampler drawing on a GPU reseeds one there
    pixels = get_family(family).sample(model, vae, tokenizer, special, cfg.prompts, generator=gen)
    images = [to_pil(p) for p in pixels]
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / f"preview_step{step:07d}.png"
    image_grid(images, cols=PREVIEW_COLUMNS, pad=0, background=(255, 255, 255)).save(grid_path)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pairs = [(png, q) for png in pngs for q in cfg.questions]
    answers = (
        answer_questions(
            model,
            tokenizer,
            special,
            pairs,
            image_size=flavor.vision.image_size,
            num_image_tokens=flavor.num_image_tokens(family),
            max_new_tokens=cfg.max_new_tokens,
        )
        if pairs
        else []  # no questions: images only
    )
    record = {
        "step": step,
        "prompts": cfg.prompts,
        "answers": [
            {"prompt": cfg.prompts[i // len(cfg.questions)], "question": q, "answer": a}
            for i, ((_, q), a) in enumerate(zip(pairs, answers, strict=True))
        ],
    }
    answers_path = out_dir / f"preview_step{step:07d}.json"
    answers_path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return {"grid": grid_path, "answers": answers_path}


def export_stage_model(model: Any, family: str, tokenizer: Any, out_dir: Path, ema: dict | None = None) -> Path:
    """The stage's model in its family's release format (with ``ema``: those weights, as released)."""
    from model.family import get_family

    return get_family(family).export(model, tokenizer, out_dir, ema)


def log_previews(tracker: Tracker, paths: dict[str, Path]) -> None:
    for path in paths.values():
        tracker.log_artifact(path, "previews")
