"""What the trainer calls: config, model/task/collate builders and the per-block list for FSDP.

cfg = ModelConfig(flavor="debug", family="janus_pro")
flavor = get_flavor(cfg.flavor)
model = build_model(flavor, cfg.family, path=cfg.path)         # plain nn.Module
counts = apply_freeze(model, resolve_family(flavor, cfg.family), stage)
task = build_task(model, flavor, cfg)                           # loss, metrics = task(batch)
collate_fn = build_collate(flavor, cfg, tokenizer)              # list[Sample] -> batch (picklable)
for block in decoder_blocks(model): fully_shard(block, ...)
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from data_prep.schema import Sample
from model.attention import KERNELS
from model.collate import collate
from model.family import family_of, get_family
from model.flavors import FAMILIES, FlavorConfig, get_flavor
from model.janus_pro import JanusProTaskConfig
from model.janusflow_task import JanusFlowTaskConfig
from model.tokenizer import load_tokenizer, special_ids


@dataclass(kw_only=True)
class ModelConfig:
    """The model section of a training recipe."""

    flavor: str = "debug"
    """Key of model.flavors.FLAVORS."""
    family: str | None = None
    """janus_pro or janusflow; None = the flavor's default."""
    path: str | None = None
    """Local checkpoint directory to start from (HF Janus-Pro, or our JanusFlow export); None = random."""
    vae_path: str | None = None
    """Local diffusers AutoencoderKL directory (JanusFlow); None = random VAE of the flavor."""
    vq_path: str | None = None
    """Local fitted JanusVQVAE directory (Janus-Pro, ``save_pretrained``) put into the model by build_task in
    place of its VQ (e.g. the debug VQ fitted on the toy world); None = the model's own VQ."""
    vision_path: str | None = None
    """Local SigLIP tower (``SiglipVisionModel.save_pretrained``, e.g. the debug one pre-fitted on the toy
    world by ``fit_tokenizers``) loaded into the understanding encoder when a run starts from scratch or from
    ``path``; a stage that starts from an earlier stage keeps the tower that stage trained. None = keep."""
    cfg_drop_prob: float = 0.1
    """Probability of replacing a generation prompt by pad tokens (classifier-free guidance training)."""
    max_len: int = 4096
    """Longest row (packed or not) in tokens."""
    pack: bool = False
    """Pack whole samples into rows of max_len (attention kept inside each sample)."""
    attention: str = "auto"
    """Training attention kernel (model.attention): varlen (FlashAttention, CUDA bf16), sdpa (per-sample
    padded SDPA, any device), or auto (varlen where it runs, else sdpa)."""
    janus_pro: JanusProTaskConfig = field(default_factory=JanusProTaskConfig)
    """Janus-Pro loss options."""
    janusflow: JanusFlowTaskConfig = field(default_factory=JanusFlowTaskConfig)
    """JanusFlow loss options."""

    def __post_init__(self) -> None:
        get_flavor(self.flavor)  # raises listing the valid names
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family {self.family!r} is not one of {FAMILIES}")
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise ValueError(f"ModelConfig.cfg_drop_prob must be in [0, 1), got {self.cfg_drop_prob}")
        if self.max_len <= 0:
            raise ValueError(f"ModelConfig.max_len must be positive, got {self.max_len}")
        if self.attention not in KERNELS:
            raise ValueError(f"ModelConfig.attention {self.attention!r} is not one of {KERNELS}")


def resolve_family(flavor: FlavorConfig, family: str | None = None) -> str:
    return flavor.family(family)


def build_model(
    flavor: FlavorConfig,
    family: str | None = None,
    *,
    path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Janus-Pro (transformers ``JanusForConditionalGeneration``) or our ``JanusFlowModel``.

    Random init from the flavor, or loaded from a local ``path``. ``device="meta"`` allocates nothing.
    """
    spec = get_family(flavor.family(family))
    return spec.load(path, flavor) if path else spec.build(flavor, device)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks, in order (FSDP shards each, then the root)."""
    return list(family_of(model).llm(model).layers)


def build_task(model: nn.Module, flavor: FlavorConfig, cfg: ModelConfig | None = None, vae=None) -> nn.Module:
    """The loss wrapper: ``loss, metrics = task(batch)`` (JanusFlow's holds its frozen VAE: ``vae``, else
    ``cfg.vae_path``, else the flavor's random one; Janus-Pro's puts the fitted ``cfg.vq_path`` in)."""
    return family_of(model).make_task(model, flavor, cfg or ModelConfig(flavor=flavor.name), vae)


def _collate_with_rng(samples: Sequence[Sample], *, seed: int | None, **kwargs) -> dict[str, torch.Tensor]:
    # One RNG per batch, derived from the seed and the batch's keys: reproducible and independent of
    # which worker runs it.
    rng = None
    if seed is not None:
        rng = random.Random(f"{seed}:" + ",".join(s.key for s in samples))
    return collate(samples, rng=rng, **kwargs)


def build_collate(
    flavor: FlavorConfig,
    cfg: ModelConfig,
    tokenizer=None,
    *,
    seed: int | None = 0,
    train: bool = True,
) -> Callable[[Sequence[Sample]], dict[str, torch.Tensor]]:
    """A picklable ``samples -> batch`` function with everything bound (tokenizer built if not given)."""
    family = flavor.family(cfg.family)
    spec = get_family(family)
    tokenizer = tokenizer or load_tokenizer(flavor, cfg.path)
    return functools.partial(
        _collate_with_rng,
        seed=seed,
        tokenizer=tokenizer,
        special=special_ids(tokenizer),
        num_image_tokens=flavor.num_image_tokens(family),
        und_image_size=flavor.vision.image_size,
        gen_image_size=spec.gen_image_size(flavor),
        cfg_drop_prob=cfg.cfg_drop_prob if train else 0.0,
        mask_dropped=spec.masks_dropped_prompts,
        max_len=cfg.max_len,
        pack=cfg.pack,
    )
