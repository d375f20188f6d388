"""Inference from a trained checkpoint: ``python -m pipelines.generate --checkpoint DIR ...``.

    --prompt "a handwritten digit 7" --out DIR [--num 4] [--seed 0]   writes DIR/{prompt slug}-{i}.png
    --image x.png --question "What digit is this?"                     prints the answer

``DIR`` is a training stage's ``final/`` folder (``model.safetensors`` + ``stage_done.json``) or an export
(Janus-Pro: transformers directory; JanusFlow: our reference-layout export). JanusFlow decodes through a VAE
that is not part of its weights: ``--vae`` (a fitted or pretrained diffusers directory), else ``DIR/vae`` or
``DIR/../../vae`` when present, else the VAE its stage trained with (``model.vae_path`` in the stage's
``inputs.json``), else the flavor's random VAE (with a warning). An inference tool, not a config job: plain flags.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from model.inference import answer, generate_images, load_for_inference


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


@dataclass(kw_only=True)
class GenerateConfig:
    """The command line of this tool (each field is a ``--flag``)."""

    checkpoint: str = ""
    """A stage's final/ folder or an export directory."""
    prompt: str | None = None
    """Text-to-image prompt."""
    out: str = "outputs/generate"
    """Folder for the PNG files."""
    num: int = 4
    """Images per prompt."""
    seed: int = 0
    """Sampling seed."""
    cfg_weight: float | None = None
    """Classifier-free guidance weight (1 = none); default: the family's paper weight (Janus-Pro 5, JanusFlow 2)."""
    temperature: float = 1.0
    """Janus-Pro image-token sampling temperature (the paper's: 1)."""
    image: str | None = None
    """Image file to ask about."""
    question: str | None = None
    """Question about --image (a text-only question without it)."""
    vae: str | None = None
    """JanusFlow: diffusers VAE directory (default: found beside the checkpoint)."""
    threads: int = 2
    """torch intra-op threads on CPU."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("GenerateConfig.checkpoint (--checkpoint) is required")
        if not self.prompt and not self.question:
            raise ValueError("give --prompt (generation) and/or --question (understanding)")
        if self.num <= 0:
            raise ValueError(f"GenerateConfig.num (--num) must be positive, got {self.num}")
        if self.cfg_weight is not None and self.cfg_weight < 1.0:
            raise ValueError(f"GenerateConfig.cfg_weight (--cfg_weight) must be >= 1, got {self.cfg_weight}")


CONFIG = GenerateConfig
_FLAG_TYPES = {"num": int, "seed": int, "threads": int, "cfg_weight": float, "temperature": float}


def _field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass (the flags' help text)."""
    import ast
    import inspect
    import itertools

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for field_node, doc in itertools.pairwise(body):
        if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field_node.target.id] = str(doc.value.value)
    return docs


def parse_args(argv: Sequence[str] | None) -> GenerateConfig:
    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__.split("\n\n")[0])
    helps = _field_docs(GenerateConfig)
    for f in fields(GenerateConfig):
        parser.add_argument(f"--{f.name}", type=_FLAG_TYPES.get(f.name, str), default=f.default, help=helps.get(f.name))
    try:
        return GenerateConfig(**vars(parser.parse_args(argv)))
    except ValueError as exc:
        parser.error(str(exc))
        raise


@dataclass(kw_only=True)
class GenerateResult:
    answer: str | None
    """The answer to ``question`` (None when none was asked)."""
    images: list[Path]
    """The written images of ``prompt`` (empty when none was asked)."""


def run(cfg: GenerateConfig) -> GenerateResult:
    """Answer the question and/or sample the prompt's images into ``out``."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    lm = load_for_inference(cfg.checkpoint, cfg.vae)
    result = GenerateResult(answer=None, images=[])
    if cfg.question:
        image = Path(cfg.image).read_bytes() if cfg.image else None
        result.answer = answer(lm, [(image, cfg.question)], max_new_tokens=64)[0]
    if cfg.prompt:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        images = generate_images(
            lm, [cfg.prompt] * cfg.num, seed=cfg.seed, cfg_weight=cfg.cfg_weight, temperature=cfg.temperature
        )
        for i, img in enumerate(images):
            path = out / f"{slug(cfg.prompt)}-{i}.png"
            img.save(path, format="PNG")
            result.images.append(path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = run(parse_args(argv))
    if result.answer is not None:
        print(result.answer)
    for path in result.images:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
