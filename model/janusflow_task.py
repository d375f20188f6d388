"""JanusFlow training: the frozen VAE, the task (text CE + rectified flow + REPA), and the EMA of weights.

Rectified flow (JANUS_SPEC): z_t = t*x + (1-t)*z0, z0 ~ N(0, I), t = 0 noise, t = 1 data; the decoder
predicts the velocity x - z0 (MSE); t ~ logit-normal(mu, sigma). REPA: the LLM hidden state after block
``flow.repa_layer`` at the generation slots -> 3-layer MLP -> negative cosine similarity with the
stop-gradient SigLIP features of the clean image on the same grid. Loss = text CE + L_RF + L_REPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from model.attention import PackedTask
from model.flavors import FlavorConfig
from model.janus_pro import slot_positions
from model.janusflow import JanusFlowModel
from model.losses import (
    Metric,
    check_reduction,
    metric,
    per_task_sums,
    put_rows,
    reduce_token_losses,
    rows_at,
    text_token_losses,
)
from model.prompts import GEN_BOI, GEN_SLOT, UND_BOI, UND_SLOT


def build_vae(flavor: FlavorConfig, device: str | torch.device | None = None) -> AutoencoderKL:
    """Random-init diffusers AutoencoderKL with the flavor's widths (SDXL-VAE config for real flavors)."""
    f = flavor.flow
    n = len(f.vae_block_out_channels)
    with torch.device(device or "cpu"):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(f.vae_block_out_channels),
            layers_per_block=f.vae_layers_per_block,
            latent_channels=f.latent_channels,
            norm_num_groups=f.vae_norm_num_groups,
            sample_size=f.image_size,
            scaling_factor=f.vae_scaling_factor,
        )
    return vae.eval().requires_grad_(False)


def load_vae(path: str | Path) -> AutoencoderKL:
    """A diffusers AutoencoderKL (e.g. SDXL-VAE) from a local directory."""
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)


@torch.no_grad()
def vae_encode(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> scaled latents (the posterior mean: deterministic targets)."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean
    return latents * vae.config.scaling_factor


def sample_logit_normal(n: int, mu: float, sigma: float, device, generator=None) -> torch.Tensor:
    return torch.sigmoid(mu + sigma * torch.randn(n, device=device, generator=generator))


@dataclass(kw_only=True)
class JanusFlowTaskConfig:
    """Loss options of the JanusFlow task."""

    t_mu: float = 0.0
    """Mean of the logit-normal t distribution (SD3 default; the paper gives none)."""
    t_sigma: float = 1.0
    """Std of the logit-normal t distribution."""
    repa_weight: float = 1.0
    """Weight of L_REPA in the generation loss (1: L_gen = L_RF + L_REPA)."""
    compute_metrics: bool = True
    """Report per-task losses."""
    reduction: str = "token"
    """Text loss: ``token`` = the mean over every trained text token; ``sample`` = each sample's own mean,
    then the mean over samples (model.losses.REDUCTIONS). The generation loss is per sample either way."""

    def __post_init__(self) -> None:
        check_reduction("JanusFlowTaskConfig", self.reduction)
        if self.t_sigma <= 0:
            raise ValueError(f"JanusFlowTaskConfig.t_sigma must be > 0, got {self.t_sigma}")
        if self.repa_weight < 0:
            raise ValueError(f"JanusFlowTaskConfig.repa_weight must be >= 0, got {self.repa_weight}")


class JanusFlowTask(PackedTask):
    """``loss, metrics = task(batch)`` for JanusFlow; holds the frozen VAE (not a trained parameter).

    The LLM runs over the packed attention layout of the batch (model.attention) with ``attention`` as its
    kernel; ``metrics`` are device-side ``(sum, count)`` pairs (model.losses.Metric). The flow state (clean
    latents, noise, t, the target velocity) is kept in fp32 whatever the model's compute dtype.
    """

    def __init__(
        self,
        model: JanusFlowModel,
        vae: AutoencoderKL | None,
        cfg: JanusFlowTaskConfig | None = None,
        attention: str = "auto",
    ):
        super().__init__(model.language_model, attention)
        self.model = model
        self._vae = [vae]  # a list hides it from .parameters()/.state_dict()/FSDP: it is frozen and not ours
        self.cfg = cfg or JanusFlowTaskConfig()

    @property
    def vae(self) -> AutoencoderKL | None:
        return self._vae[0]

    def _apply(self, fn, recurse=True):
        # task.to(device/dtype) moves the hidden VAE too
        if self._vae[0] is not None:
            self._vae[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def latents(self, batch: dict) -> torch.Tensor | None:
        """The clean scaled latents x1 (fp32) of the generation images, or None."""
        if "gen_latents" in batch:
            return batch["gen_latents"].float() * self.model.flavor.flow.vae_scaling_factor
        pix = batch.get("gen_pixel_values")
        if pix is None or not pix.shape[0]:
            if batch["gen_task"].numel():
                raise ValueError("batch has generation samples but neither gen_latents nor gen_pixel_values")
            return None
        if self.vae is None:
            raise ValueError("JanusFlowTask needs a VAE to encode gen_pixel_values")
        return vae_encode(self.vae, pix).float()

    def embed(self, batch: dict, x1: torch.Tensor | None):
        """Input embeddings and, for generation, the flow state (z0, decoder skip, t_emb)."""
        m = self.model
        embeds = m.language_model.get_input_embeddings()(batch["input_ids"])
        und = batch.get("und_pixel_values")
        if und is not None and und.shape[0]:
            feats = m.understanding_features(und.to(embeds.dtype))
            embeds = put_rows(embeds, slot_positions(batch, UND_SLOT, "und_slot_pos"), feats)
            boi = m.beg_of_und_embed.expand(und.shape[0], -1)
            embeds = put_rows(embeds, slot_positions(batch, UND_BOI, "und_boi_pos"), boi)
        if x1 is None:
            return embeds, None
        t = sample_logit_normal(x1.shape[0], self.cfg.t_mu, self.cfg.t_sigma, x1.device)
        z0 = torch.randn_like(x1)
        tt = t.view(-1, 1, 1, 1)
        zt = tt * x1 + (1 - tt) * z0
        tokens, t_emb, skip = m.encode_latents(zt, t)
        embeds = put_rows(embeds, slot_positions(batch, GEN_SLOT, "gen_slot_pos"), tokens)
        embeds = put_rows(embeds, slot_positions(batch, GEN_BOI, "gen_boi_pos"), t_emb)
        return embeds, (z0, skip, t_emb)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, Metric]]:
        m = self.model
        x1 = self.latents(batch)
        embeds, flow = self.embed(batch, x1)
        capture = m.flavor.flow.repa_layer if flow is not None else 0
        hidden, mid = self.run_llm(m.language_model.model, embeds, batch, capture)
        text_ce = text_token_losses(hidden, batch, m.language_model.lm_head)
        n = batch["sample_task"].shape[0]
        loss = reduce_token_losses([text_ce], hidden, [batch["text_sample"]], self.cfg.reduction, n)
        metrics: dict[str, Metric] = {}
        rf_per_sample = text_ce[:0]
        rf = repa = text_ce.new_zeros(())
        if flow is not None:
            rf_per_sample, repa = self.generation_losses(batch, hidden, mid, x1, flow)
            rf = rf_per_sample.mean()
            loss = loss + rf + self.cfg.repa_weight * repa
        has_gen = float(flow is not None)  # count 0: no generation sample in this micro-batch
        metrics["loss/rf"] = (rf.detach(), rf.new_full((), has_gen))
        metrics["loss/repa"] = (repa.detach(), rf.new_full((), has_gen))
        metrics["loss"] = metric(loss)
        if self.cfg.compute_metrics:  # text tasks: token CE; generation tasks: their samples' RF loss
            tasks = torch.cat([batch["text_task"], batch["gen_task"][: rf_per_sample.shape[0]]])
            metrics.update(per_task_sums(torch.cat([text_ce, rf_per_sample]), tasks, "loss"))
        return loss, metrics

    def generation_losses(self, batch, hidden, mid, x1, flow) -> tuple[torch.Tensor, torch.Tensor]:
        """(RF loss per generation sample [N_g], REPA loss) in fp32."""
        m, (z0, skip, t_emb) = self.model, flow
        slots = slot_positions(batch, GEN_SLOT, "gen_slot_pos")
        n, d = x1.shape[0], hidden.shape[-1]
        v = m.decode_velocity(rows_at(hidden, slots).view(n, -1, d), skip, t_emb)
        per_sample = (v.float() - (x1 - z0)).pow(2).mean(dim=(1, 2, 3))
        pix = batch.get("gen_pixel_values")
        if pix is None or self.cfg.repa_weight == 0:
            return per_sample, per_sample.new_zeros(())
        pred = m.repa_head(rows_at(mid, slots).view(n, -1, d))
        with torch.no_grad():
            target = m.vision_und_enc_model(pixel_values=pix.to(pred.dtype)).last_hidden_state
        repa = -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
        return per_sample, repa


@dataclass
class EMAState:
    """Exponential moving average of the trainable weights (the released JanusFlow is the EMA)."""

    decay: float
    shadow: dict[str, torch.Tensor]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def build_ema(model: nn.Module, decay: float = 0.99) -> EMAState:
    """Shadow copies of the parameters that train (frozen ones equal themselves; no copy needed)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return EMAState(decay=decay, shadow=shadow)


@torch.no_grad()
def apply_ema_update(ema: EMAState, model: nn.Module) -> None:
    """shadow <- decay * shadow + (1 - decay) * param, after each optimizer step."""
    for name, p in model.named_parameters():
        if name in ema.shadow:
            ema.shadow[name].lerp_(p.detach(), 1.0 - ema.decay)


def ema_state_dict(ema: EMAState, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with the EMA values in place of the trained ones (what gets exported)."""
    state = dict(model.state_dict())
    state.update({n: t for n, t in ema.shadow.items() if n in state})
    return state


def make_task(model: JanusFlowModel, flavor: FlavorConfig, cfg, vae: AutoencoderKL | None = None) -> JanusFlowTask:
    """The JanusFlow loss wrapper with its frozen VAE: ``vae``, else ``cfg.vae_path``, else the flavor's
    random one."""
    if vae is None:
        vae = load_vae(cfg.vae_path) if cfg.vae_path else build_vae(flavor)
    return JanusFlowTask(model, vae, cfg.janusflow, attention=cfg.attention)
