"""JanusFlow: rectified flow inside the LLM (continuous VAE latents), our own implementation.

Module and parameter names follow the reference code (github deepseek-ai/Janus, ``janus/janusflow``) so an
export is a state dict the reference ``MultiModalityCausalLM`` loads strictly (see model.export for the one
renamed part: the SigLIP tower, ours from transformers, theirs timm-style).

- generation encoder (``vision_gen_enc_model``): a patch_size-stride conv patchifies the latent, two ConvNeXt
  blocks (depthwise 7x7, RMSNorm, 4x MLP with GRN, AdaLN scale/shift from the time embedding); the sinusoidal
  time embedding of t*1000 goes through an MLP to the LLM width and takes the ``<begin_of_image>`` slot;
- generation decoder (``vision_gen_dec_model``): RMSNorm, concat with the encoder skip, two ConvNeXt blocks,
  RMSNorm + 1x1 conv + PixelShuffle back to latent channels (the velocity);
- ``repa_head``: the training-only 3-layer MLP of REPA (never exported).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers import LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from model.flavors import FlavorConfig, FlowConfig
from model.janus_pro import build_llama_config


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input: x * (1 + gamma * N(x)) + beta, zero-initialised."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        relative = spatial / (spatial.mean(dim=-1, keepdim=True) + 1e-6)
        return x * (1 + self.weight * relative) + self.bias


class ConvNextBlock(nn.Module):
    """Residual ConvNeXt block followed by AdaLN modulation from a conditioning vector."""

    def __init__(self, channels: int, cond_dim: int, eps: float, ffn_factor: int = 4):
        super().__init__()
        inner = channels * ffn_factor
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.norm = nn.RMSNorm(channels, eps=eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels)
        self.channelwise_dropout = nn.Dropout(0.0)
        self.cond_embeds_mapper = nn.Linear(cond_dim, channels * 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_norm(self.channelwise_act(h))
        h = self.channelwise_dropout(self.channelwise_linear_2(h))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class BlockStack(nn.Module):
    """``mid_block``: ConvNeXt blocks sharing one conditioning vector."""

    def __init__(self, channels: int, cond_dim: int, num_blocks: int, eps: float):
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNextBlock(channels, cond_dim, eps) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, cond)
        return x


class GenerationEncoder(nn.Module):
    """Noisy latent + t -> (grid features [B, C, g, g], time embedding [B, D], skip for the decoder)."""

    def __init__(self, cfg: FlowConfig, llm_dim: int):
        super().__init__()
        c = cfg.channels
        self.time_proj = Timesteps(c, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c, llm_dim)
        self.in_conv = nn.Conv2d(cfg.latent_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.mid_block = BlockStack(c, llm_dim, cfg.num_blocks, cfg.norm_eps)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``t`` in [0, 1] (0 = noise, 1 = data); the sinusoid sees t * 1000 like the reference."""
        # t and z come from outside the (possibly bf16) model: cast them to its compute dtype where they enter
        t_emb = self.time_embed(self.time_proj(t.flatten() * 1000.0).to(self.time_embed.linear_1.weight.dtype))
        x = self.mid_block(self.in_conv(z.to(self.in_conv.weight.dtype)), t_emb)
        return x, t_emb, x


class Unpatchify(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, patch_size: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(in_channels, eps=eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size**2, kernel_size=1)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.pixel_shuffle(self.unpatch_conv(x))


class GenerationDecoder(nn.Module):
    """LLM grid features + encoder skip + time embedding -> velocity [B, latent_channels, L, L]."""

    def __init__(self, cfg: FlowConfig, llm_dim: int):
        super().__init__()
        c = cfg.channels
        self.input_norm = nn.RMSNorm(c, eps=cfg.norm_eps)
        self.mid_block = BlockStack(2 * c, llm_dim, cfg.num_blocks, cfg.norm_eps)
        self.out_convs = nn.ModuleList([Unpatchify(2 * c, cfg.latent_channels, cfg.patch_size, cfg.norm_eps)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.mid_block(torch.cat([x, skip], dim=1), t_emb)
        for conv in self.out_convs:
            x = conv(x)
        return x


def build_siglip_config(flavor: FlavorConfig) -> SiglipVisionConfig:
    """SigLIP as the reference's timm tower computes it: exact GELU, LayerNorm eps 1e-6, MAP head kept."""
    v = flavor.vision
    return SiglipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        vision_use_head=True,
    )


class JanusFlowModel(nn.Module):
    """The JanusFlow network (no VAE: it is frozen and lives beside, see model.janusflow_task.build_vae)."""

    def __init__(self, flavor: FlavorConfig):
        super().__init__()
        d, flow = flavor.llm.hidden_size, flavor.flow
        vd = flavor.vision.hidden_size
        self.flavor = flavor
        self.vision_und_enc_model = SiglipVisionModel(build_siglip_config(flavor))
        self.vision_und_enc_aligner = nn.Linear(vd, d)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, d))
        self.vision_gen_enc_model = GenerationEncoder(flow, d)
        self.vision_gen_enc_aligner = nn.Linear(flow.channels, d)
        self.vision_gen_dec_model = GenerationDecoder(flow, d)
        self.language_model = LlamaForCausalLM(build_llama_config(flavor))
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(d, eps=flavor.llm.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(d, flow.channels)
        h = flow.repa_hidden_size
        self.repa_head = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, vd))

    def understanding_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, grid*grid, D] aligned SigLIP features."""
        feats = self.vision_und_enc_model(pixel_values=pixel_values).last_hidden_state
        return self.vision_und_enc_aligner(feats)

    def encode_latents(self, z: torch.Tensor, t: torch.Tensor):
        """Noisy latents -> (LLM tokens [N, g*g, D], time embedding [N, D], decoder skip)."""
        x, t_emb, skip = self.vision_gen_enc_model(z, t)
        tokens = self.vision_gen_enc_aligner(x.flatten(2).transpose(1, 2))
        return tokens, t_emb, skip

    def decode_velocity(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """LLM hidden states of the N x g*g generation slots [N, g*g, D] -> velocity [N, C, L, L]."""
        n, g = hidden.shape[0], skip.shape[-1]
        x = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden))
        x = x.reshape(n, g, g, -1).permute(0, 3, 1, 2)
        return self.vision_gen_dec_model(x, skip, t_emb)


def build_janusflow(flavor: FlavorConfig, device: str | torch.device | None = None) -> JanusFlowModel:
    """Random-init JanusFlow; ``device="meta"`` for parameter counts of the real size."""
    with torch.device(device or "cpu"):
        return JanusFlowModel(flavor)


def check_flavor(flavor: FlavorConfig) -> None:
    """REPA compares the LLM's generation slots with SigLIP's patches on the same grid."""
    if flavor.vision.grid != flavor.flow.grid:
        raise ValueError(
            f"FlavorConfig {flavor.name}: REPA needs vision grid {flavor.vision.grid} == flow grid {flavor.flow.grid}"
        )
