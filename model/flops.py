"""Training FLOPs per sample / per batch, for the trainer's MFU metric.

LLM: 6 N per token (N = decoder-block parameters: forward 2N + backward 4N) plus attention
12 L D T per token with context T (PaLM's convention, no causal discount), text head 6 D V per trained text
token. Heads and aligners: 6 x their parameters per token they see. Encoders (SigLIP, VQ, VAE, JanusFlow
encoder/decoder) are measured once per flavor with torch's FlopCounterMode on the meta device (exact for
their convs and attention, no memory); frozen ones cost their forward only (x1), trained ones x3.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from model.flavors import FlavorConfig
from model.prompts import GEN_SLOT, UND_SLOT

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0}
"""Dense bf16 peak per GPU, by device-name fragment (for the MFU estimate)."""


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override, a known GPU, or None (CPU: no meaningful peak)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def _eager_attention(model: torch.nn.Module) -> None:
    """Attention as plain matmuls: FlopCounterMode does not see fused CPU/meta SDPA kernels."""
    for module in (model, *model.children()):
        if hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation("eager")


def _measure(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=16)
def _encoder_forward_flops(flavor_json: str, family: str) -> dict[str, float]:
    from model.export import flavor_from_dict
    from model.family import get_family

    flavor = flavor_from_dict(json.loads(flavor_json))
    spec = get_family(family)
    model = spec.build(flavor, "meta")
    _eager_attention(model)
    with torch.device("meta"):
        return spec.encoder_flops(model, flavor)


def janus_pro_encoder_flops(model: torch.nn.Module, flavor: FlavorConfig) -> dict[str, float]:
    und = torch.zeros(1, 3, flavor.vision.image_size, flavor.vision.image_size)
    gen = torch.zeros(1, 3, flavor.vq.image_size, flavor.vq.image_size)
    return {
        "siglip": _measure(lambda: model.model.vision_model(pixel_values=und)),
        "vq_encode": _measure(lambda: model.model.vqmodel.encode(gen)),
    }


def janusflow_encoder_flops(model: torch.nn.Module, flavor: FlavorConfig) -> dict[str, float]:
    from model.janusflow_task import build_vae

    f, vae = flavor.flow, build_vae(flavor, device="meta")
    vae.set_attn_processor(AttnProcessor())
    und = torch.zeros(1, 3, flavor.vision.image_size, flavor.vision.image_size)
    gen = torch.zeros(1, 3, f.image_size, f.image_size)
    z = torch.zeros(1, f.latent_channels, f.latent_size, f.latent_size)
    tokens, t_emb, skip = model.encode_latents(z, torch.zeros(1))
    return {
        "siglip": _measure(lambda: model.vision_und_enc_model(pixel_values=und)),
        "vae_encode": _measure(lambda: vae.encode(gen)),
        "gen_encoder": _measure(lambda: model.encode_latents(z, torch.zeros(1))),
        "gen_decoder": _measure(lambda: model.decode_velocity(tokens, skip, t_emb)),
    }


def encoder_forward_flops(flavor: FlavorConfig, family: str | None = None) -> dict[str, float]:
    """Forward FLOPs of one image through each encoder/decoder of the family (cached per flavor)."""
    return dict(_encoder_forward_flops(json.dumps(asdict(flavor), sort_keys=True), flavor.family(family)))


def llm_block_params(flavor: FlavorConfig) -> int:
    llm = flavor.llm
    return llm.num_layers * (4 * llm.hidden_size**2 + 3 * llm.hidden_size * llm.intermediate_size)


def _siglip(enc: dict[str, float], stage: int) -> float:
    return enc["siglip"] * (3 if stage >= 3 else 1)  # trained from stage III, forward only before


def janus_pro_image_flops(flavor: FlavorConfig, enc: dict[str, float], stage: int, precomputed: bool):
    """(per understanding image, per generation image): aligners, the image head over every token, the VQ."""
    d, vd, n = flavor.llm.hidden_size, flavor.vision.hidden_size, flavor.vq.grid**2
    und = _siglip(enc, stage) + 6 * n * (vd * d + d * d)
    per_token = 6 * (flavor.vq.embed_dim * d + d * d) + 6 * (d * d + d * flavor.vq.codebook_size)
    return und, n * per_token + (0 if precomputed else enc["vq_encode"])


def janusflow_image_flops(flavor: FlavorConfig, enc: dict[str, float], stage: int, precomputed: bool):
    """(per understanding image, per generation image): the aligner, the trained encoder/decoder and REPA head,
    SigLIP's forward for the REPA target, the VAE."""
    d, vd, n, h = flavor.llm.hidden_size, flavor.vision.hidden_size, flavor.flow.grid**2, flavor.flow.repa_hidden_size
    und = _siglip(enc, stage) + 6 * n * vd * d
    gen = 3 * (enc["gen_encoder"] + enc["gen_decoder"]) + 6 * n * (d * h + h * h + h * vd)
    gen += enc["siglip"] + (0 if precomputed else enc["vae_encode"])  # REPA target: forward only
    return und, gen


def _per_image_flops(flavor: FlavorConfig, family: str, stage: int, precomputed: bool) -> tuple[float, float]:
    """(per understanding image, per generation image) FLOPs outside the LLM blocks."""
    from model.family import get_family

    return get_family(family).image_flops(flavor, encoder_forward_flops(flavor, family), stage, precomputed)


def flops_per_sample(
    flavor: FlavorConfig,
    family: str | None = None,
    *,
    seq_len: int,
    text_targets: int,
    und_images: int = 0,
    gen_images: int = 0,
    stage: int = 2,
    precomputed: bool = True,
) -> float:
    """Training FLOPs of one sample of ``seq_len`` tokens (``precomputed``: VQ ids / latents in shards)."""
    family = flavor.family(family)
    llm = flavor.llm
    tokens = 6 * llm_block_params(flavor) * seq_len + 12 * llm.num_layers * llm.hidden_size * seq_len**2
    text = 6 * llm.hidden_size * llm.vocab_size * text_targets
    und, gen = _per_image_flops(flavor, family, stage, precomputed)
    return float(tokens + text + und_images * und + gen_images * gen)


def flops_per_batch(flavor: FlavorConfig, family: str | None, batch: dict, *, stage: int = 2) -> float:
    """Training FLOPs of a collated batch (packed or not): exact segment lengths for attention."""
    family = flavor.family(family)
    llm, seg = flavor.llm, batch["segment_ids"]
    lengths = torch.stack([(seg == s).sum(1) for s in range(1, int(seg.max()) + 1)]) if seg.max() > 0 else seg
    n_tokens = int((seg > 0).sum())
    attn = 12 * llm.num_layers * llm.hidden_size * float((lengths.double() ** 2).sum())
    text = 6 * llm.hidden_size * llm.vocab_size * int((batch["labels"][:, 1:] != -100).sum())
    n = flavor.num_image_tokens(family)
    from model.family import get_family

    precomputed = get_family(family).precomputed_key in batch
    und, gen = _per_image_flops(flavor, family, stage, precomputed)
    n_und = int((batch["kinds"] == UND_SLOT).sum()) // n
    n_gen = int((batch["kinds"] == GEN_SLOT).sum()) // n
    return float(6 * llm_block_params(flavor) * n_tokens + attn + text + n_und * und + n_gen * gen)
