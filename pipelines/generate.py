"""Inference from a trained checkpoint: ``python -m pipelines.generate --checkpoint DIR ...``.

    --prompt "a handwritten digit 7" --out DIR [--num 4] [--seed 0]   writes DIR/{prompt slug}-{i}.png
    --image x.png --question "What digit is this?"                     prints the answer

``DIR`` is a training stage's ``final/`` folder (``model.safetensors`` + ``stage_done.json``) or an export
(Janus-Pro: transformers directory; JanusFlow: our reference-layout export). JanusFlow decodes through a VAE
that is not part of its weights: ``--vae`` (a fitted or pretrained diffusers directory), else ``DIR/vae`` or
``DIR/../../vae`` when present, else the flavor's random VAE (with a warning). An inference tool, not a config
job: plain flags.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from model.build import build_model
from model.flavors import FlavorConfig, get_flavor
from model.tokenizer import SpecialIds, load_tokenizer, special_ids

DONE_FILE = "stage_done.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    """A model ready for sampling, with what the samplers need beside it."""

    model: nn.Module
    family: str
    flavor: FlavorConfig
    tokenizer: object
    special: SpecialIds
    vae: nn.Module | None = None


def _find_vae(checkpoint: Path, vae_path: str | None) -> str | None:
    if vae_path:
        return vae_path
    for cand in (checkpoint / "vae", checkpoint.parent.parent / "vae"):
        if (cand / "config.json").is_file():
            return str(cand)
    return None


def _load_weights(checkpoint: Path) -> tuple[nn.Module, FlavorConfig, str, str | None]:
    """-> model, flavor, family, tokenizer path (None = the flavor's debug tokenizer)."""
    done = checkpoint / DONE_FILE
    if done.is_file():  # a training stage's final weights: the model's own state_dict keys
        from safetensors.torch import load_file

        info = json.loads(done.read_text())
        flavor = get_flavor(info["flavor"])
        family = flavor.family(info["family"])
        model = build_model(flavor, family)
        model.load_state_dict(load_file(str(checkpoint / WEIGHTS_FILE)), strict=True)
        return model, flavor, family, None
    from model.export import FLAVOR_FILE, flavor_from_dict

    tok_path = str(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    if (checkpoint / FLAVOR_FILE).is_file():
        flavor = flavor_from_dict(json.loads((checkpoint / FLAVOR_FILE).read_text()))
        return build_model(flavor, "janusflow", path=checkpoint), flavor, "janusflow", tok_path
    if (checkpoint / "config.json").is_file():
        model = build_model(get_flavor("janus_pro_1b"), "janus_pro", path=checkpoint)
        return model, _janus_pro_flavor(model), "janus_pro", tok_path
    raise FileNotFoundError(f"{checkpoint}: neither {DONE_FILE} (a stage's final/) nor an export")


def _janus_pro_flavor(model: nn.Module) -> FlavorConfig:
    """The sizes the samplers need, read off a loaded Janus-Pro export (flavor debug when it matches)."""
    debug = get_flavor("debug")
    vision = model.config.vision_config
    if vision.image_size == debug.vision.image_size and model.config.text_config.vocab_size == debug.llm.vocab_size:
        return debug
    return get_flavor("janus_pro_1b")


def load_for_inference(checkpoint: str | Path, vae_path: str | None = None) -> LoadedModel:
    """Model (eval mode), tokenizer and, for JanusFlow, the VAE that decodes its latents."""
    checkpoint = Path(checkpoint)
    model, flavor, family, tok_path = _load_weights(checkpoint)
    tokenizer = load_tokenizer(flavor, tok_path)
    vae = None
    if family == "janusflow":
        from model.janusflow_task import build_vae, load_vae

        found = _find_vae(checkpoint, vae_path)
        if found is None:
            print(f"warning: {checkpoint}: no VAE given or found; decoding with a random VAE", file=sys.stderr)
        vae = load_vae(found) if found else build_vae(flavor)
    return LoadedModel(model.eval(), family, flavor, tokenizer, special_ids(tokenizer), vae)


def generate_images(
    lm: LoadedModel,
    prompts: list[str],
    seed: int = 0,
    batch_size: int = 8,
    cfg_weight: float | None = None,
    temperature: float = 1.0,
) -> list[Image.Image]:
    """Sample one image per prompt, batched; seeded. ``cfg_weight`` None = the family's paper weight
    (Janus-Pro 5, JanusFlow 2); ``temperature`` scales Janus-Pro's image-token sampling (the paper's is 1;
    JanusFlow's ODE sampler has none: any other value is an error)."""
    from model.sampling import generate_images_janus_pro, generate_images_janusflow

    if cfg_weight is not None and cfg_weight < 1.0:
        raise ValueError(f"cfg_weight must be >= 1 (1 = no guidance), got {cfg_weight}")
    if temperature <= 0 or (lm.family == "janusflow" and temperature != 1.0):
        raise ValueError(f"temperature {temperature}: must be > 0, and 1 for JanusFlow (its sampler has none)")
    guidance = {} if cfg_weight is None else {"cfg_weight": float(cfg_weight)}
    gen = torch.Generator().manual_seed(seed)
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        if lm.family == "janus_pro":
            _, pix = generate_images_janus_pro(
                lm.model, lm.tokenizer, lm.special, chunk, generator=gen, temperature=temperature, **guidance
            )
        else:
            _, pix = generate_images_janusflow(
                lm.model, lm.vae, lm.tokenizer, lm.special, chunk, generator=gen, **guidance
            )
        out += [to_pil(p) for p in pix]
    return out


def answer(lm: LoadedModel, questions: list[tuple[bytes | None, str]], max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to (image bytes, question) pairs."""
    from model.sampling import answer_questions

    return answer_questions(
        lm.model,
        lm.tokenizer,
        lm.special,
        questions,
        image_size=lm.flavor.vision.image_size,
        num_image_tokens=lm.flavor.num_image_tokens(lm.family),
        max_new_tokens=max_new_tokens,
    )


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB."""
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def image_grid(images: Sequence[Image.Image], cols: int, pad: int = 2) -> Image.Image:
    """Images (same size) in rows of ``cols`` on a grey background."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (128, 128, 128))
    for i, img in enumerate(images):
        grid.paste(img, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    lm = load_for_inference(args.checkpoint, args.vae)
    if args.question:
        image = Path(args.image).read_bytes() if args.image else None
        print(answer(lm, [(image, args.question)], max_new_tokens=64)[0])
    if args.prompt:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        images = generate_images(
            lm, [args.prompt] * args.num, seed=args.seed, cfg_weight=args.cfg_weight, temperature=args.temperature
        )
        for i, img in enumerate(images):
            path = out / f"{slug(args.prompt)}-{i}.png"
            img.save(path, format="PNG")
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
