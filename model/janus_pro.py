"""Janus-Pro on transformers' ``JanusForConditionalGeneration``: build, load, and the training task.

The model is stock transformers (so an export loads with ``from_pretrained`` and samples with its own
``generate``); what transformers lacks is the image-token loss, which :class:`JanusProTask` adds:
VQ ids (precomputed or encoded by the frozen VQ) are embedded by ``generation_embeddings`` +
``generation_aligner`` into the generation slots, the LLM runs once over the mixed batch, and
``generation_head`` on the hidden state one position earlier predicts each id (``<begin_of_image>`` -> id 0,
id k -> id k+1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.attention import PackedTask
from model.flavors import FlavorConfig
from model.losses import (
    Metric,
    check_reduction,
    linear_cross_entropy,
    metric,
    per_task_sums,
    put_rows,
    reduce_token_losses,
    rows_at,
    text_token_losses,
)
from model.prompts import GEN_SLOT, UND_SLOT


def build_llama_config(flavor: FlavorConfig) -> LlamaConfig:
    llm = flavor.llm
    return LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rope_theta=llm.rope_theta,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=False,
    )


def build_vq_config(flavor: FlavorConfig) -> JanusVQVAEConfig:
    vq, d = flavor.vq, flavor.llm.hidden_size
    return JanusVQVAEConfig(
        embed_dim=vq.embed_dim,
        num_embeddings=vq.codebook_size,
        latent_channels=vq.latent_channels,
        base_channels=vq.base_channels,
        channel_multiplier=list(vq.channel_multiplier),
        num_res_blocks=vq.num_res_blocks,
        num_patches=vq.grid,
        projection_dim=d,
        image_token_embed_dim=d,
        num_hidden_layers=2,
    )


def build_janus_config(flavor: FlavorConfig) -> JanusConfig:
    """transformers' JanusConfig with the flavor's dimensions (Janus-Pro layout: 2-layer aligners)."""
    v = flavor.vision
    vision = JanusVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        mlp_ratio=v.intermediate_size / v.hidden_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        projection_dim=flavor.llm.hidden_size,
        depth=2,
        num_image_tokens=v.grid * v.grid,
    )
    return JanusConfig(
        text_config=build_llama_config(flavor),
        vision_config=vision,
        vq_config=build_vq_config(flavor),
        image_token_id=flavor.image_token_id,
        tie_word_embeddings=False,
    )


def janus_vision_state(siglip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``SiglipVisionModel`` state dict as transformers' ``JanusVisionModel`` holds it: the same network, with
    the attention output projection named ``projection_layer`` and no pooling head (``head.*`` dropped)."""
    return {
        k.replace("self_attn.out_proj.", "self_attn.projection_layer."): v
        for k, v in siglip.items()
        if not k.startswith("head.")
    }


def build_vq(flavor: FlavorConfig) -> JanusVQVAE:
    """A standalone random-init VQ (to be fitted, then loaded into ``model.model.vqmodel``)."""
    return JanusVQVAE(build_vq_config(flavor)).eval()


def apply_vq(model: JanusForConditionalGeneration, vq: JanusVQVAE, init_gen_embeddings: bool = True) -> None:
    """Put a fitted VQ (same config) into a Janus-Pro model, frozen. With ``init_gen_embeddings`` the
    (trainable) generation embeddings start from its codebook (both [codebook_size, embed_dim]): a warm start
    of our choosing, the papers do not say how they were initialised."""
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.vqmodel.eval().requires_grad_(False)
    if init_gen_embeddings:
        with torch.no_grad():
            model.model.generation_embeddings.weight.copy_(vq.quantize.embedding.weight)


def load_vq(path: str | Path) -> JanusVQVAE:
    """A fitted VQ saved with ``save_pretrained`` (safetensors), frozen."""
    return JanusVQVAE.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)


def holds_vq(model: JanusForConditionalGeneration, vq: JanusVQVAE) -> bool:
    """Whether the model's VQ already has exactly these weights (e.g. a later stage started from an earlier)."""
    own = model.model.vqmodel.state_dict()
    return all(torch.equal(own[k].cpu(), v.cpu()) for k, v in vq.state_dict().items())


def build_janus_pro(flavor: FlavorConfig, device: str | torch.device | None = None):
    """Random-init Janus-Pro. ``device="meta"`` builds without memory (parameter counts of real sizes)."""
    config = build_janus_config(flavor)
    with torch.device(device or "cpu"):
        model = JanusForConditionalGeneration(config)
    return model


def load_janus_pro(path: str | Path, dtype: torch.dtype = torch.float32) -> JanusForConditionalGeneration:
    """An HF-format Janus-Pro checkpoint from a local directory (e.g. a converted Janus-Pro-1B)."""
    return JanusForConditionalGeneration.from_pretrained(str(path), dtype=dtype, local_files_only=True)


@torch.no_grad()
def vq_encode(model: JanusForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> [N, h*w] code ids with the frozen VQ."""
    vq = model.model.vqmodel
    ids = vq.encode(pixel_values.to(vq.dtype)).image_tokens
    return ids.view(pixel_values.shape[0], -1)


def slot_positions(batch: dict, kind: int, key: str) -> torch.Tensor:
    """Flat positions of one kind of slot: the collate function's (no host sync), or found from ``kinds``
    (inference batches built elsewhere)."""
    if key in batch:
        return batch[key]
    return (batch["kinds"].reshape(-1) == kind).nonzero().squeeze(1)


def janus_pro_embeddings(model: JanusForConditionalGeneration, batch: dict, gen_ids: torch.Tensor | None):
    """Token embeddings with SigLIP features in understanding slots and VQ embeddings in generation slots."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    und = batch.get("und_pixel_values")
    if und is not None and und.shape[0]:
        feats = model.model.get_image_features(und.to(embeds.dtype), return_dict=True).pooler_output
        embeds = put_rows(embeds, slot_positions(batch, UND_SLOT, "und_slot_pos"), feats)
    if gen_ids is not None and gen_ids.shape[0]:
        gen = model.prepare_embeddings_for_image_generation(gen_ids)
        embeds = put_rows(embeds, slot_positions(batch, GEN_SLOT, "gen_slot_pos"), gen)
    return embeds


@dataclass(kw_only=True)
class JanusProTaskConfig:
    """Loss options of the Janus-Pro task."""

    compute_metrics: bool = True
    """Report per-task losses (device-side sums; no host sync)."""
    reduction: str = "token"
    """``token``: the mean over every trained text and image token; ``sample``: each sample's own mean, then
    the mean over samples (model.losses.REDUCTIONS)."""

    def __post_init__(self) -> None:
        check_reduction("JanusProTaskConfig", self.reduction)


class JanusProTask(PackedTask):
    """``loss, metrics = task(batch)``: text CE + image-token CE over the trained tokens (see the reduction).

    The LLM runs over the packed attention layout of the batch (model.attention) with ``attention`` as its
    kernel; ``metrics`` are device-side ``(sum, count)`` pairs (model.losses.Metric).
    """

    def __init__(self, model: JanusForConditionalGeneration, cfg: JanusProTaskConfig | None = None, attention="auto"):
        super().__init__(model.model.language_model, attention)
        self.model = model
        self.cfg = cfg or JanusProTaskConfig()

    def gen_ids(self, batch: dict) -> torch.Tensor | None:
        if "gen_ids" in batch:
            return batch["gen_ids"]
        pix = batch.get("gen_pixel_values")
        if pix is None or not pix.shape[0]:
            if batch["gen_task"].numel():
                raise ValueError("batch has generation samples but neither gen_ids nor gen_pixel_values")
            return None
        return vq_encode(self.model, pix)

    def image_token_losses(self, hidden: torch.Tensor, batch: dict, ids: torch.Tensor) -> torch.Tensor:
        """CE of each image id [N_g * n]: the hidden state one slot earlier predicts it (<begin_of_image> -> id 0)."""
        head = self.model.model.generation_head
        pre = head.activation_fn(head.proj_out(rows_at(hidden, batch["gen_slot_pos"] - 1)))
        return linear_cross_entropy(pre, head.vision_head, ids.reshape(-1))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, Metric]]:
        model = self.model
        ids = self.gen_ids(batch)
        embeds = janus_pro_embeddings(model, batch, ids)
        hidden, _ = self.run_llm(model.model.language_model, embeds, batch)
        text_ce = text_token_losses(hidden, batch, model.lm_head)
        has_images = ids is not None and ids.shape[0] > 0
        img_ce = self.image_token_losses(hidden, batch, ids) if has_images else text_ce[:0]
        n_img = ids.shape[1] if has_images else 0
        sample_ids = [batch["text_sample"], batch["gen_sample"].repeat_interleave(n_img)]
        n = batch["sample_task"].shape[0]
        loss = reduce_token_losses([text_ce, img_ce], hidden, sample_ids, self.cfg.reduction, n)
        metrics = {"loss": metric(loss)}
        if self.cfg.compute_metrics:  # text and generation tasks are disjoint: one sum per task
            tasks = torch.cat([batch["text_task"], batch["gen_task"].repeat_interleave(n_img)])
            metrics.update(per_task_sums(torch.cat([text_ce, img_ce]), tasks, "loss"))
        return loss, metrics


def check_flavor(flavor: FlavorConfig) -> None:
    """transformers' Janus uses one ``num_image_tokens`` for understanding and generation."""
    if flavor.vision.grid != flavor.vq.grid:
        raise ValueError(f"FlavorConfig {flavor.name}: vision grid {flavor.vision.grid} != vq grid {flavor.vq.grid}")


def make_task(model: JanusForConditionalGeneration, flavor: FlavorConfig, cfg, vae=None) -> JanusProTask:
    """The Janus-Pro loss wrapper. With ``cfg.vq_path`` the fitted VQ replaces the model's (and seeds the
    generation embeddings) unless the model already holds it, so a stage started from an earlier stage keeps
    its trained embeddings."""
    if cfg.vq_path:
        vq = load_vq(cfg.vq_path)
        if not holds_vq(model, vq):
            apply_vq(model, vq)
    return JanusProTask(model, cfg.janus_pro, attention=cfg.attention)


def is_export(path: Path) -> bool:
    """A transformers directory of a Janus model."""
    import json

    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "janus"


def load_export(path: Path) -> tuple[JanusForConditionalGeneration, FlavorConfig]:
    """A Janus-Pro export -> the model and the flavor the samplers need (debug when its sizes match)."""
    from model.flavors import get_flavor

    model = load_janus_pro(path)
    debug = get_flavor("debug")
    vision, text = model.config.vision_config, model.config.text_config
    if vision.image_size == debug.vision.image_size and text.vocab_size == debug.llm.vocab_size:
        return model, debug
    return model, get_flavor("janus_pro_1b" if text.hidden_size == 2048 else "janus_pro_7b")
