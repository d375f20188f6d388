"""Inference from trained weights: load a stage's final/ folder or an export, sample images, answer questions.

``load_for_inference(DIR)`` takes a training stage's ``final/`` folder (``model.safetensors`` +
``stage_done.json``) or an export (Janus-Pro: transformers directory; JanusFlow: our reference-layout
export). JanusFlow decodes through a VAE that is not part of its weights: ``vae_path`` (a fitted or pretrained
diffusers directory), else ``DIR/vae`` or ``DIR/../../vae`` when present, else, for a stage's ``final/``, the
``model.vae_path`` its stage trained with (recorded in the stage's ``inputs.json``), else the flavor's random VAE
(with a warning; ``require_vae=True`` makes it an error, as the evaluation does: a random VAE grades noise).
Used by the generate and evaluate jobs and by the MLflow model (model.mlflow_model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from model.build import build_model
from model.family import get_family
from model.flavors import FAMILIES, FlavorConfig, get_flavor
from model.tokenizer import SpecialIds, load_tokenizer, special_ids
from model.weights import DONE_FILE, INPUTS_FILE, StageWeights, load_weights

log = logging.getLogger("model.inference")


@dataclass
class LoadedModel:
    """A model ready for sampling, with what the samplers need beside it."""

    model: nn.Module
    family: str
    flavor: FlavorConfig
    tokenizer: object
    special: SpecialIds
    vae: nn.Module | None = None


def _recorded_vae(checkpoint: Path) -> str | None:
    """The ``model.vae_path`` a stage's ``final/`` was trained with, from the stage folder's ``inputs.json``."""
    record = checkpoint.parent / INPUTS_FILE
    if not (checkpoint / DONE_FILE).is_file() or not record.is_file():
        return None
    try:
        inputs = json.loads(record.read_text()).get("inputs", {})
        path = inputs.get("model", {}).get("vae_path")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); not using its recorded VAE", record, exc)
        return None
    return path if isinstance(path, str) and path else None


def _find_vae(checkpoint: Path, vae_path: str | None) -> tuple[str | None, list[str]]:
    """-> the VAE directory to load (None: none found) and the places looked at, for the error message."""
    if vae_path:
        return vae_path, [vae_path]
    looked = []
    recorded = _recorded_vae(checkpoint)
    for cand in (checkpoint / "vae", checkpoint.parent.parent / "vae", *([Path(recorded)] if recorded else [])):
        looked.append(str(cand))
        if (cand / "config.json").is_file():
            return str(cand), looked
    return None, looked


def _load_weights(checkpoint: Path) -> tuple[nn.Module, FlavorConfig, str, str | None]:
    """-> model, flavor, family, tokenizer path (None = the flavor's debug tokenizer)."""
    if StageWeights.exists(checkpoint):  # a training stage's final weights: the model's own state_dict keys
        record = StageWeights.read(checkpoint)
        flavor = get_flavor(record.flavor)
        family = flavor.family(record.family)
        model = build_model(flavor, family)
        model.load_state_dict(load_weights(checkpoint), strict=True)
        return model, flavor, family, None
    tok_path = str(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    for name in FAMILIES:
        spec = get_family(name)
        if spec.is_export(checkpoint):
            model, flavor = spec.load_export(checkpoint)
            return model, flavor, name, tok_path
    raise FileNotFoundError(f"{checkpoint}: neither {DONE_FILE} (a stage's final/) nor an export")


def load_for_inference(
    checkpoint: str | Path, vae_path: str | None = None, *, require_vae: bool = False
) -> LoadedModel:
    """Model (eval mode), tokenizer and, for JanusFlow, the VAE that decodes its latents. With ``require_vae``
    a JanusFlow checkpoint whose VAE is neither given nor found is an error instead of a random VAE."""
    checkpoint = Path(checkpoint)
    model, flavor, family, tok_path = _load_weights(checkpoint)
    tokenizer = load_tokenizer(flavor, tok_path)
    vae = None
    if get_family(family).needs_vae:
        from model.janusflow_task import build_vae, load_vae

        found, looked = _find_vae(checkpoint, vae_path)
        if found is None and require_vae:
            raise FileNotFoundError(
                f"{checkpoint}: a {family} checkpoint needs the VAE that decodes its latents and none was found "
                f"(looked in {', '.join(looked)}); pass the fitted VAE's directory (vae_path=...)"
            )
        if found is None:
            log.warning("%s: no VAE given or found; decoding with a random VAE", checkpoint)
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
    spec = get_family(lm.family)
    if cfg_weight is not None and cfg_weight < 1.0:
        raise ValueError(f"cfg_weight must be >= 1 (1 = no guidance), got {cfg_weight}")
    if temperature <= 0 or (not spec.samples_with_temperature and temperature != 1.0):
        raise ValueError(f"temperature {temperature}: must be > 0, and 1 for {lm.family} (its sampler has none)")
    weight = None if cfg_weight is None else float(cfg_weight)
    gen = torch.Generator().manual_seed(seed)
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        pix = spec.sample(
            lm.model, lm.vae, lm.tokenizer, lm.special, chunk, generator=gen, cfg_weight=weight, temperature=temperature
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


def image_grid(
    images: Sequence[Image.Image], cols: int, pad: int = 2, background: tuple[int, int, int] = (128, 128, 128)
) -> Image.Image:
    """Images (same size) in rows of ``cols``, ``pad`` pixels apart on a ``background`` (grey) canvas."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), background)
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def save_mlflow_model(weights: str | Path, out_dir: str | Path, vae: str | Path | None = None) -> Path:
    """An MLflow pyfunc model directory around ``weights`` (a stage's export or final/ folder; for JanusFlow
    also its ``vae``), loadable with ``mlflow.pyfunc.load_model`` (model.pyfunc_model: from code, with this
    package's model/ and data_prep/ copied in, so no pickle and no install of this repository is needed)."""
    import importlib.metadata as md

    import mlflow.pyfunc

    root = Path(__file__).resolve().parents[1]
    artifacts = {"weights": str(weights)}
    if vae is not None:
        artifacts["vae"] = str(vae)
    pins = [f"{p}=={md.version(p)}" for p in ("torch", "transformers", "diffusers", "safetensors", "pillow")]
    mlflow.pyfunc.save_model(
        str(out_dir),
        python_model=str(root / "model" / "pyfunc_model.py"),
        signature=_pyfunc_signature(),
        artifacts=artifacts,
        code_paths=[str(root / "model"), str(root / "data_prep")],
        pip_requirements=[*pins, f"mlflow=={md.version('mlflow')}", "pandas", "numpy"],
    )
    return Path(out_dir)


def _pyfunc_signature():
    """Rows of prompt / question (+ image, base64 PNG) in; image (base64 PNG) / answer out; sampling params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    def columns(*names: str) -> Schema:
        return Schema([ColSpec("string", n, required=False) for n in names])

    params = ParamSchema(
        [
            ParamSpec("seed", "long", 0),
            ParamSpec("cfg_weight", "double", 0.0),  # 0: the family's paper weight
            ParamSpec("temperature", "double", 1.0),
            ParamSpec("max_new_tokens", "long", 32),
        ]
    )
    return ModelSignature(
        inputs=columns("prompt", "question", "image"), outputs=columns("image", "answer"), params=params
    )
