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
from torch import nn
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.collate import build_attention_bias
from model.flavors import FlavorConfig
from model.losses import check_reduction, per_task_means, reduce_token_losses, text_token_losses, token_sample_ids
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


def janus_pro_embeddings(model: JanusForConditionalGeneration, batch: dict, gen_ids: torch.Tensor | None):
    """Token embeddings with SigLIP features in understanding slots and VQ embeddings in generation slots."""
    kinds = batch["kinds"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    und = batch.get("und_pixel_values")
    if und is not None and und.shape[0]:
        feats = model.model.get_image_features(und.to(embeds.dtype), return_dict=True).pooler_output
        mask = (kinds == UND_SLOT).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    if gen_ids is not None and gen_ids.shape[0]:
        gen = model.prepare_embeddings_for_image_generation(gen_ids)
        mask = (kinds == GEN_SLOT).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, gen.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
    return embeds


def llm_attention(batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """2D padding mask for one sample per row; a block-diagonal 4D mask for packed rows."""
    if int(batch["segment_ids"].max()) <= 1:
        return batch["attention_mask"]
    return build_attention_bias(batch["segment_ids"], batch["attention_mask"], dtype)


@dataclass(kw_only=True)
class JanusProTaskConfig:
    """Loss options of the Janus-Pro task."""

    compute_metrics: bool = True
    """Report per-task losses (one host sync per task per step)."""
    reduction: str = "token"
    """``token``: the mean over every trained text and image token; ``sample``: each sample's own mean, then
    the mean over samples (model.losses.REDUCTIONS)."""

    def __post_init__(self) -> None:
        check_reduction("JanusProTaskConfig", self.reduction)


class JanusProTask(nn.Module):
    """``loss, metrics = task(batch)``: text CE + image-token CE, averaged over all trained tokens."""

    def __init__(self, model: JanusForConditionalGeneration, cfg: JanusProTaskConfig | None = None):
        super().__init__()
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

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        model = self.model
        ids = self.gen_ids(batch)
        embeds = janus_pro_embeddings(model, batch, ids)
        hidden = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=llm_attention(batch, embeds.dtype),
            position_ids=batch["position_ids"],
        ).last_hidden_state
        text_ce, text_mask = text_token_losses(hidden, batch["labels"], model.lm_head)
        # hidden state at p-1 predicts the id in generation slot p: <begin_of_image> predicts id 0
        gen_next = batch["kinds"][:, 1:] == GEN_SLOT
        img_ce = hidden.new_zeros(0)
        if ids is not None and ids.shape[0]:
            logits = model.model.generation_head(hidden[:, :-1][gen_next])
            img_ce = nn.functional.cross_entropy(logits.float(), ids.reshape(-1), reduction="none")
        ids_of = None
        if self.cfg.reduction == "sample":
            seg = batch["segment_ids"]
            # the image ids of generation sample g sit in the slots of its own row and segment
            ids_of = [token_sample_ids(seg, text_mask), token_sample_ids(seg, gen_next)]
        loss = reduce_token_losses([text_ce, img_ce], hidden, ids_of, self.cfg.reduction)
        metrics: dict[str, float] = {"loss": float(loss.detach())}
        if self.cfg.compute_metrics:
            metrics.update(per_task_means(text_ce, batch["token_task"][:, 1:][text_mask], "loss"))
            if img_ce.numel():
                n = ids.shape[1]
                metrics.update(per_task_means(img_ce, batch["gen_task"].repeat_interleave(n), "loss"))
            metrics["tokens/text"] = float(text_ce.numel())
            metrics["tokens/image"] = float(img_ce.numel())
        return loss, metrics
