"""Fitting a flavor's generation tokenizers on images: the Janus-Pro VQ and the JanusFlow VAE.

Real runs load pretrained ones (LlamaGen VQ-16, SDXL-VAE); the debug flavor's are random, which makes the
generated pixels meaningless, so the toy-world demo fits them first (a few hundred CPU steps on 64x64 images).

- VQ: VQ-GAN without the GAN and the perceptual loss: L1 + L2 reconstruction, codebook + commitment losses,
  straight-through gradients. Codes and encoder outputs are L2-normalised (LlamaGen); the fitted codebook is
  stored unit-norm, so the stock ``JanusVQVAE.encode`` (plain nearest neighbour) picks the same codes as the
  cosine lookup trained here, and its ``decode`` (which normalises) sees the same vectors. The codebook starts
  from encoder outputs and dead codes are restarted on random encoder outputs (k-means style).
- VAE: diffusers ``AutoencoderKL``: L1 + L2 reconstruction of a posterior sample + a small KL. The fitted
  ``scaling_factor`` is 1 / std of the latents (as Stable Diffusion), so the flow model sees unit-scale latents.

Both fit on ``device`` (CPU by default; on one H200 the debug VQ recipe's 300 steps took about 12 s) and are
returned on the CPU.
Both are saved with ``save_pretrained`` (safetensors) and loaded with ``model.janus_pro.load_vq`` /
``model.janusflow_task.load_vae``; ``ModelConfig.vq_path`` / ``vae_path`` point the trainer at them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.collate import preprocess_generation
from model.flavors import FlavorConfig
from model.janus_pro import build_vq
from model.janusflow_task import build_vae

Log = Callable[[int, dict[str, float]], None]


@dataclass(kw_only=True)
class FitStats:
    """What a fit reports: reconstruction quality before and after, and how the codebook is used."""

    psnr_before: float = 0.0
    psnr_after: float = 0.0
    mse_before: float = 0.0
    mse_after: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        base = {k: float(v) for k, v in vars(self).items() if k != "extra"}
        return {f"{prefix}/{k}": v for k, v in {**base, **self.extra}.items()}


def image_tensor(images: Iterable[bytes], size: int) -> torch.Tensor:
    """Encoded images -> [N, 3, size, size] in [-1, 1] (short side resized, centre-cropped)."""
    tensors = [preprocess_generation(data, size) for data in images]
    if not tensors:
        raise ValueError("no images to fit on")
    return torch.stack(tensors)


def psnr(mse: float) -> float:
    """PSNR in dB of pixels in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def _batches(n: int, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield torch.tensor(order[:batch])
        order = order[batch:]


def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.2) -> torch.Tensor:
    """[N, 1, H, W]: 1 on background, 1 + ``weight`` where a pixel differs from its image's border colour.

    Toy images are mostly flat background (white behind shapes, black behind digits); without this the small
    objects that carry the meaning (a shape's colour) are the cheapest thing to get wrong.
    """
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    fg = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return 1.0 + weight * fg


def _recon_loss(
    recon: torch.Tensor, x: torch.Tensor, fg_weight: float, patch: int = 8, patch_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L2 + L1, plus ``patch_weight`` x L2 of the patch-mean colours (one patch per code: a small
    codebook otherwise spends its codes on edges and drops colour)."""
    w = foreground_weights(x, fg_weight) if fg_weight > 0 else torch.ones_like(x[:, :1])
    err = recon - x
    loss = ((w * err.square()).mean() + (w * err.abs()).mean()) / w.mean()
    if patch_weight > 0:
        loss = loss + patch_weight * F.mse_loss(F.avg_pool2d(recon, patch), F.avg_pool2d(x, patch))
    return loss, F.mse_loss(recon, x).detach()


# ---- VQ ------------------------------------------------------------------------------------------------


def vq_latents(vq: JanusVQVAE, x: torch.Tensor) -> torch.Tensor:
    """Unit-norm encoder outputs [N, h, w, d]."""
    z = vq.quant_conv(vq.encoder(x))
    return F.normalize(z.permute(0, 2, 3, 1), dim=-1)


def vq_quantize(vq: JanusVQVAE, z: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine nearest code -> (straight-through quantised [N, d, h, w], codebook + commitment loss, ids)."""
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    ids = (flat @ codes.T).argmax(-1)
    q = codes[ids].view_as(z)
    loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    q = z + (q - z).detach()
    return q.permute(0, 3, 1, 2).contiguous(), loss, ids.view(z.shape[0], -1)


def vq_reconstruct(vq: JanusVQVAE, x: torch.Tensor, beta: float = 0.25, quantize: bool = True):
    """(reconstruction, codebook + commitment loss, ids, unit-norm latents). ``quantize=False`` decodes the
    latents themselves (ids None, no codebook loss): a diagnostic of what the encoder/decoder alone keep."""
    z = vq_latents(vq, x)
    if not quantize:
        return vq.decoder(vq.post_quant_conv(z.permute(0, 3, 1, 2))), z.new_zeros(()), None, z
    q, vq_loss, ids = vq_quantize(vq, z, beta)
    return vq.decoder(vq.post_quant_conv(q)), vq_loss, ids, z


@torch.no_grad()
def _restart_codes(vq: JanusVQVAE, z: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> int:
    """Move codes unused since the last restart onto random encoder outputs of the current batch."""
    dead = (counts == 0).nonzero().flatten()
    if dead.numel():
        flat = z.reshape(-1, z.shape[-1])
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=gen).to(flat.device)
        vq.quantize.embedding.weight[dead] = flat[pick]
    return int(dead.numel())


@torch.no_grad()
def eval_vq(vq: JanusVQVAE, x: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Reconstruction MSE / PSNR through the stock encode/decode, and codebook usage."""
    vq.eval()
    err, used = 0.0, torch.zeros(vq.config.num_embeddings, device=x.device)
    for chunk in x.split(batch):
        ids = vq.encode(chunk).image_tokens.view(chunk.shape[0], -1)
        recon = vq.decode(ids).clamp(-1, 1)
        err += F.mse_loss(recon, chunk, reduction="sum").item()
        used += torch.bincount(ids.flatten(), minlength=used.numel()).float()
    mse = err / x.numel()
    p = used / used.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {"mse": mse, "psnr": psnr(mse), "codes_used": float((used > 0).sum()), "perplexity": perplexity}


def fit_vq(
    flavor: FlavorConfig,
    images: Iterable[bytes],
    steps: int = 400,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    batch_size: int = 16,
    beta: float = 0.25,
    restart_every: int = 25,
    foreground_weight: float = 4.0,
    patch_colour_weight: float = 8.0,
    quantize: bool = True,
    device: str | torch.device = "cpu",
    log: Log | None = None,
) -> tuple[JanusVQVAE, FitStats]:
    """A VQ of the flavor fitted on ``images`` (encoded bytes); returns it (eval mode, frozen) and its stats.
    ``quantize=False`` fits the encoder/decoder as a plain autoencoder of the unit-norm latents, a diagnostic
    (its codebook is untrained: reconstruct with ``vq_reconstruct(..., quantize=False)``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = image_tensor(images, flavor.vq.image_size).to(device)
    vq = build_vq(flavor).to(device)
    before = eval_vq(vq, x)
    counts = torch.zeros(vq.config.num_embeddings, device=device)
    with torch.no_grad():  # start the codebook on encoder outputs
        _restart_codes(vq, vq_latents(vq, x[:batch_size]), counts, gen)
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    start = time.perf_counter()
    vq.train()
    for step, idx in enumerate(_batches(len(x), batch_size, steps, seed), start=1):
        recon, vq_loss, ids, z = vq_reconstruct(vq, x[idx], beta, quantize)
        down = flavor.vq.downsample
        rec, mse = _recon_loss(recon, x[idx], foreground_weight, down, patch_colour_weight)
        loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        restarted = 0
        if ids is not None:
            counts += torch.bincount(ids.flatten(), minlength=counts.numel()).float()
        if ids is not None and step % restart_every == 0 and step <= steps * 3 // 4:  # the last quarter settles
            restarted = _restart_codes(vq, z.detach(), counts, gen)
            counts.zero_()
        if log:
            log(step, {"vq/loss": loss.item(), "vq/mse": mse.item(), "vq/restarted": float(restarted)})
    with torch.no_grad():  # unit-norm codes: stock nearest-neighbour encode == cosine lookup
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    vq.eval().requires_grad_(False)
    after = eval_vq(vq, x)
    vq.cpu()
    stats = FitStats(
        psnr_before=before["psnr"],
        psnr_after=after["psnr"],
        mse_before=before["mse"],
        mse_after=after["mse"],
        seconds=time.perf_counter() - start,
        steps=steps,
        extra={"codes_used": after["codes_used"], "perplexity": after["perplexity"]},
    )
    return vq, stats


# ---- VAE -----------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_vae(vae: AutoencoderKL, x: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Reconstruction through the posterior mean, and the std of the (unscaled) latents."""
    vae.eval()
    err, latents = 0.0, []
    for chunk in x.split(batch):
        mean = vae.encode(chunk).latent_dist.mean
        recon = vae.decode(mean).sample.clamp(-1, 1)
        err += F.mse_loss(recon, chunk, reduction="sum").item()
        latents.append(mean)
    mse = err / x.numel()
    return {"mse": mse, "psnr": psnr(mse), "latent_std": torch.cat(latents).std().item()}


def fit_vae(
    flavor: FlavorConfig,
    images: Iterable[bytes],
    steps: int = 400,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    batch_size: int = 16,
    kl_weight: float = 1e-4,
    foreground_weight: float = 4.0,
    device: str | torch.device = "cpu",
    log: Log | None = None,
) -> tuple[AutoencoderKL, FitStats]:
    """An AutoencoderKL of the flavor fitted on ``images``; its scaling_factor set to 1 / latent std."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = image_tensor(images, flavor.flow.image_size).to(device)
    vae = build_vae(flavor).requires_grad_(True).to(device)
    before = eval_vae(vae, x)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    start = time.perf_counter()
    vae.train()
    for step, idx in enumerate(_batches(len(x), batch_size, steps, seed), start=1):
        post = vae.encode(x[idx]).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        rec, mse = _recon_loss(recon, x[idx], foreground_weight)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log:
            log(step, {"vae/loss": loss.item(), "vae/mse": mse.item(), "vae/kl": kl.item()})
    vae.eval().requires_grad_(False)
    after = eval_vae(vae, x)
    vae.cpu()
    vae.register_to_config(scaling_factor=1.0 / max(after["latent_std"], 1e-6))
    stats = FitStats(
        psnr_before=before["psnr"],
        psnr_after=after["psnr"],
        mse_before=before["mse"],
        mse_after=after["mse"],
        seconds=time.perf_counter() - start,
        steps=steps,
        extra={"latent_std": after["latent_std"], "scaling_factor": vae.config.scaling_factor},
    )
    return vae, stats
