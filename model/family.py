"""One spec per model family (in the spirit of torchtitan's TrainSpec): everything that differs between
Janus-Pro and JanusFlow is reached through :func:`get_family` / :func:`family_of`; no other module branches
on a family's name.

``FAMILY_SPECS`` is the registry (a plain dict, filled here, no registration by import side effects). The
functions a spec points at live beside their kind of code (model/janus_pro.py, model/janusflow*.py,
model/sampling.py, model/export.py, model/flops.py); this module only assembles them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.flavors import FAMILIES, FlavorConfig


@dataclass(frozen=True)
class TokenizerArtifact:
    """The generation tokenizer a family trains against (fitted on the toy world, pretrained otherwise)."""

    name: str
    """Its folder under the fitted tokenizers' directory, and its section in fit_tokenizers' config."""
    config_key: str
    """The ModelConfig field that points training at it."""


@dataclass(frozen=True)
class FamilySpec:
    """What a family is made of and how each part of the pipeline handles it."""

    name: str
    model_type: type[nn.Module]
    param_groups: Mapping[str, tuple[str, ...]]
    """Freeze group -> parameter-name prefixes (model.freeze)."""
    freeze_schedule: Mapping[int, frozenset[str]]
    """Stage (1, 2, 3) -> the groups that train."""
    tokenizer: TokenizerArtifact
    precomputed_key: str
    """The batch key of precomputed generation targets (VQ ids / VAE latents)."""
    masks_dropped_prompts: bool
    """A prompt dropped for classifier-free guidance is also masked out of attention."""
    keeps_ema: bool
    """Training keeps an EMA of the weights, and the export is the EMA (the released model is)."""
    paper_cfg_weight: float
    samples_with_temperature: bool
    """Its image sampler draws tokens (a temperature applies) rather than integrating an ODE."""
    build: Callable[[FlavorConfig, Any], nn.Module]
    """Random init from a flavor (``device="meta"`` allocates nothing)."""
    load: Callable[[str | Path, FlavorConfig], nn.Module]
    """From a local checkpoint or export directory."""
    make_task: Callable[..., nn.Module]
    """(model, flavor, ModelConfig, vae) -> the loss wrapper."""
    llm: Callable[[nn.Module], nn.Module]
    """The transformers Llama decoder (``LlamaModel``) inside the model."""
    lm_head: Callable[[nn.Module], nn.Module]
    vision: Callable[[nn.Module], nn.Module]
    """The understanding encoder (SigLIP) inside the model."""
    siglip_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    """A transformers ``SiglipVisionModel`` state dict -> the understanding encoder's (model.fit_vision)."""
    understanding_embeds: Callable[[nn.Module, dict], torch.Tensor]
    """Inference: token embeddings with the understanding images in their slots."""
    sample: Callable[..., torch.Tensor]
    """(model, vae, tokenizer, special, prompts, *, generator, cfg_weight, temperature) -> pixels in [-1, 1]."""
    export: Callable[..., Path]
    """(model, tokenizer, out_dir, state) -> the release-format directory (state: e.g. the EMA weights)."""
    gen_grid: Callable[[FlavorConfig], int]
    """Side of the generation token grid (tokens per image = its square)."""
    gen_image_size: Callable[[FlavorConfig], int]
    encoder_flops: Callable[[nn.Module, FlavorConfig], dict[str, float]]
    """Forward FLOPs of one image through each encoder/decoder, measured on a meta model (model.flops)."""
    image_flops: Callable[[FlavorConfig, dict[str, float], int, bool], tuple[float, float]]
    """(flavor, encoder FLOPs, stage, precomputed) -> training FLOPs per understanding / generation image
    outside the LLM blocks."""
    check_flavor: Callable[[FlavorConfig], None]
    """Raise if a flavor's dimensions cannot build this family."""
    is_export: Callable[[Path], bool]
    """Whether a directory holds this family's export (release format)."""
    load_export: Callable[[Path], tuple[nn.Module, FlavorConfig]]
    """An export directory -> the model and the flavor it was built from."""

    @property
    def needs_vae(self) -> bool:
        """Its generated latents decode through a separate frozen VAE (not part of its weights)."""
        return self.tokenizer.name == "vae"

    def vae_for(self, model_cfg: Any) -> str | None:
        """The frozen decoder a sampler needs beside the weights (JanusFlow's VAE), from a ModelConfig."""
        return getattr(model_cfg, self.tokenizer.config_key) if self.needs_vae else None


def _janus_pro() -> FamilySpec:
    from transformers import JanusForConditionalGeneration

    from model import export, flops, freeze, janus_pro, sampling

    return FamilySpec(
        name="janus_pro",
        model_type=JanusForConditionalGeneration,
        param_groups=freeze.PARAM_GROUPS["janus_pro"],
        freeze_schedule=freeze.FREEZE_SCHEDULES["janus_pro"],
        tokenizer=TokenizerArtifact("vq", "vq_path"),
        precomputed_key="gen_ids",
        masks_dropped_prompts=False,
        keeps_ema=False,
        paper_cfg_weight=5.0,
        samples_with_temperature=True,
        build=janus_pro.build_janus_pro,
        load=lambda path, flavor: janus_pro.load_janus_pro(path),
        make_task=janus_pro.make_task,
        llm=lambda m: m.model.language_model,
        lm_head=lambda m: m.lm_head,
        vision=lambda m: m.model.vision_model,
        siglip_state=janus_pro.janus_vision_state,
        understanding_embeds=lambda m, batch: janus_pro.janus_pro_embeddings(m, batch, None),
        sample=sampling.sample_janus_pro,
        export=lambda m, tokenizer, out, state=None: export.export_janus_pro(m, tokenizer, out),
        gen_grid=lambda f: f.vq.grid,
        gen_image_size=lambda f: f.vq.image_size,
        encoder_flops=flops.janus_pro_encoder_flops,
        image_flops=flops.janus_pro_image_flops,
        check_flavor=janus_pro.check_flavor,
        is_export=janus_pro.is_export,
        load_export=janus_pro.load_export,
    )


def _janusflow() -> FamilySpec:
    from model import export, flops, freeze, janusflow, janusflow_task, sampling

    return FamilySpec(
        name="janusflow",
        model_type=janusflow.JanusFlowModel,
        param_groups=freeze.PARAM_GROUPS["janusflow"],
        freeze_schedule=freeze.FREEZE_SCHEDULES["janusflow"],
        tokenizer=TokenizerArtifact("vae", "vae_path"),
        precomputed_key="gen_latents",
        masks_dropped_prompts=True,
        keeps_ema=True,
        paper_cfg_weight=2.0,
        samples_with_temperature=False,
        build=janusflow.build_janusflow,
        load=lambda path, flavor: export.load_janusflow(path, flavor),
        make_task=janusflow_task.make_task,
        llm=lambda m: m.language_model.model,
        lm_head=lambda m: m.language_model.lm_head,
        vision=lambda m: m.vision_und_enc_model,
        siglip_state=dict,  # the same class (SiglipVisionModel)
        understanding_embeds=sampling.janusflow_understanding_embeds,
        sample=sampling.sample_janusflow,
        export=lambda m, tokenizer, out, state=None: export.export_janusflow(m, out, tokenizer, state=state),
        gen_grid=lambda f: f.flow.grid,
        gen_image_size=lambda f: f.flow.image_size,
        encoder_flops=flops.janusflow_encoder_flops,
        image_flops=flops.janusflow_image_flops,
        check_flavor=janusflow.check_flavor,
        is_export=lambda path: (path / export.FLAVOR_FILE).is_file(),
        load_export=export.load_janusflow_export,
    )


_BUILDERS: dict[str, Callable[[], FamilySpec]] = {"janus_pro": _janus_pro, "janusflow": _janusflow}
FAMILY_SPECS: dict[str, FamilySpec] = {}
"""Filled on first use (the specs import the model code, which imports the flavors this module needs)."""
if tuple(_BUILDERS) != FAMILIES:
    raise RuntimeError(f"model.family builds {tuple(_BUILDERS)} but model.flavors.FAMILIES is {FAMILIES}")


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; an unknown name lists the valid ones."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown model family {name!r}; valid families: {sorted(_BUILDERS)}")
    if name not in FAMILY_SPECS:
        FAMILY_SPECS[name] = _BUILDERS[name]()
    return FAMILY_SPECS[name]


def family_of(model: nn.Module) -> FamilySpec:
    """The spec of a built model (by its class)."""
    for name in _BUILDERS:
        spec = get_family(name)
        if isinstance(model, spec.model_type):
            return spec
    raise TypeError(f"{type(model).__name__} is no model of a known family {sorted(_BUILDERS)}")
