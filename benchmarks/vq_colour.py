"""Where the debug VQ loses the toy shapes' colours: the codebook, or the encoder/decoder architecture.

    .venv/bin/python benchmarks/vq_colour.py --toyworld outputs/toyworld [--steps 300] [--max-images N] [--json F]

Fits, on the same toy training images (digits and shapes, 600 each) with the same loss, steps, batch and
learning rate as ``configs/data/fit_tokenizers_toy.yaml``:

- ``vq``: the shipped debug VQ fit (transformers' ``JanusVQVAE``, 8x8 codes of a 256-entry codebook);
- ``vq_no_codebook``: the same encoder/decoder as a plain autoencoder of its unit-norm 8x8x8 latents (no
  quantisation): what the architecture keeps by itself;
- ``kl_8x``: a diffusers ``AutoencoderKL`` (the JanusFlow debug VAE's widths plus one level, so an 8x8x4
  latent: the same grid), fitted as the VAE is;
- ``kl_8x_vq_widths``: ``kl_8x`` with the VQ's widths (32, 32, 64, 64) and its 32 norm groups: the diffusers
  blocks against transformers' at the same sizes. Measured at 300 steps (hue judge): 0.33 here (0.45 in a
  standalone run of the same fit), against 0.16-0.19 for ``vq_no_codebook`` and 0.705 for ``kl_8x``. The widths
  cost about half of ``kl_8x``'s colour. The VQ's norm groups are not the gap: with every GroupNorm at 1 group
  and no codebook it keeps 0.18, and at 128 channels (4-8 per group, the real model's) 0.245;
- ``vq_grid16``: the shipped VQ fit with one level fewer (``channel_multiplier`` [1, 2, 2]), a 16x16 code grid:
  the JanusFlow VAE's grid, which keeps 97% of the colours. Measured at 300 steps: 0.175, so the 8x8 grid is
  not what loses them;
- ``plain_8x``: a plain convolutional autoencoder (three stride-2 convs down to the same 8x8x8 latent, three
  nearest-upsample convs back; no norms, residual blocks, attention or codebook), fitted with the VQ's loss,
  steps, batch and learning rate: what the data, loss and step budget allow. Measured at 300 steps: 0.47 in 49
  s, against 0.165-0.33 for every transformers ``JanusVQVAE`` variant tried (README). Nearly the same plain net
  with one more conv in its decoder kept 0.18 in one fit, so single fits of either kind can flip;
- ``vq_no_out_norm``: the shipped VQ fit with the decoder's last GroupNorm left out (a diagnostic: the stock
  ``JanusVQVAE`` cannot be built without it). At the debug width, 32 channels in transformers' fixed 32 groups,
  that norm is an instance norm: on a toy shape image (one colour on white) it scales each channel's map to the
  same +-pattern whatever the colour. Measured: overfitting 16 shapes for 150 steps without the codebook, colours
  kept went from 0.19 to 0.56 without it; in this full fit, with the codebook, it does not help (0.18 vs 0.20).

and prints, on held-out images (the eval split), the fraction of shapes whose colour survives the round trip
(``judge_colour``), PSNR per source and seconds per step. If ``vq_no_codebook`` loses the colours as ``vq``
does, a bigger codebook will not bring them back. ``--fits`` picks some of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import model.fit_tokenizers as fit_tokenizers
from common.config import load_config
from common.tables import text_table
from model.fit_tokenizers import fit_vae, fit_vq, image_tensor, psnr, vq_reconstruct
from model.flavors import get_flavor
from training.tokenizers import FitTokenizersConfig, collect_heldout, collect_images, colour_kept

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "data" / "fit_tokenizers_toy.yaml"


@contextlib.contextmanager
def _no_decoder_out_norm() -> Iterator[None]:
    """``fit_vq`` builds VQs whose decoder ends without its last GroupNorm (conv_out reads SiLU(h) directly)."""
    build = fit_tokenizers.build_vq

    def build_without(flavor):
        vq = build(flavor)
        vq.decoder.norm_out = nn.Identity()
        return vq

    fit_tokenizers.build_vq = build_without
    try:
        yield
    finally:
        fit_tokenizers.build_vq = build


def _fit_no_out_norm(*args, **kwargs):
    with _no_decoder_out_norm():
        return fit_vq(*args, **kwargs)


class PlainAutoencoder(nn.Module):
    """The reference for ``plain_8x``: stride-2 convs to an 8x8 grid of ``latent`` channels and back."""

    def __init__(self, width: int = 32, latent: int = 8) -> None:
        super().__init__()
        w, act = width, nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1), act(), nn.Conv2d(w, w, 4, 2, 1), act(), nn.Conv2d(w, 2 * w, 4, 2, 1), act(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), act(), nn.Conv2d(2 * w, latent, 1),
        )  # fmt: skip
        up = [nn.Upsample(scale_factor=2)]
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, 2 * w, 3, 1, 1), act(), *up, nn.Conv2d(2 * w, 2 * w, 3, 1, 1), act(), *up,
            nn.Conv2d(2 * w, w, 3, 1, 1), act(), *up, nn.Conv2d(w, w, 3, 1, 1), act(), nn.Conv2d(w, 3, 3, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _fit_plain(images: list[bytes], size: int, steps: int, lr: float, seed: int, *, batch_size: int,
               foreground_weight: float, patch_colour_weight: float) -> tuple[PlainAutoencoder, None]:  # fmt: skip
    """``fit_vq``'s loop and loss (``fit_tokenizers._recon_loss``) on a ``PlainAutoencoder``."""
    torch.manual_seed(seed)
    x = image_tensor(images, size)
    net = PlainAutoencoder()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for idx in fit_tokenizers._batches(len(x), batch_size, steps, seed):
        loss, _ = fit_tokenizers._recon_loss(net(x[idx]), x[idx], foreground_weight, 8, patch_colour_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False), None


@torch.no_grad()
def _roundtrip(kind: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = []
    for chunk in x.split(64):
        if kind.startswith("kl_8x"):
            out.append(module.decode(module.encode(chunk).latent_dist.mean).sample)
        elif kind == "plain_8x":
            out.append(module(chunk))
        else:
            out.append(vq_reconstruct(module, chunk, quantize=kind != "vq_no_codebook")[0])
    return torch.cat(out).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", required=True, help="an existing toy world (python -m pipelines.toyworld)")
    parser.add_argument("--steps", type=int, default=0, help="fit steps (0 = the recipe's VQ steps)")
    parser.add_argument("--max-images", type=int, default=0, help="images per source (0 = the recipe's)")
    parser.add_argument("--fits", default="", help="comma-separated fits to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    limit = [f"max_images_per_source={args.max_images}", f"heldout_images={args.max_images}"] if args.max_images else []
    cfg = load_config(FitTokenizersConfig, RECIPE, [f"toyworld_dir={args.toyworld}", *limit])
    steps = args.steps or cfg.vq.steps
    images, heldout = collect_images(cfg), collect_heldout(cfg)
    flat = [img for imgs in images.values() for img in imgs]
    flavor = get_flavor(cfg.flavor)
    wide = get_flavor(cfg.flavor)  # one more level: the VAE's latent grid becomes the VQ's
    wide.flow.vae_block_out_channels = [*wide.flow.vae_block_out_channels, wide.flow.vae_block_out_channels[-1]]
    vq_widths = get_flavor(cfg.flavor)  # the diffusers blocks at the VQ's widths and norm groups
    vq_widths.flow.vae_block_out_channels = [flavor.vq.base_channels * m for m in flavor.vq.channel_multiplier]
    vq_widths.flow.vae_norm_num_groups = 32  # transformers' JanusVQVAE hard-codes 32
    grid16 = get_flavor(cfg.flavor)  # one level fewer: a 16x16 code grid
    grid16.vq.channel_multiplier = grid16.vq.channel_multiplier[:-1]
    opts = {"batch_size": cfg.vq.batch_size, "foreground_weight": cfg.vq.foreground_weight}
    patch = {"patch_colour_weight": cfg.vq.patch_colour_weight}
    fits = {
        "vq": lambda: fit_vq(flavor, flat, steps, cfg.vq.lr, cfg.seed, **opts,
                             patch_colour_weight=cfg.vq.patch_colour_weight),
        "vq_no_codebook": lambda: fit_vq(flavor, flat, steps, cfg.vq.lr, cfg.seed, **opts,
                                         patch_colour_weight=cfg.vq.patch_colour_weight, quantize=False),
        "kl_8x": lambda: fit_vae(wide, flat, steps, cfg.vq.lr, cfg.seed, **opts),
        "kl_8x_vq_widths": lambda: fit_vae(vq_widths, flat, steps, cfg.vq.lr, cfg.seed, **opts),
        "vq_no_out_norm": lambda: _fit_no_out_norm(flavor, flat, steps, cfg.vq.lr, cfg.seed, **opts,
                                                   patch_colour_weight=cfg.vq.patch_colour_weight),
        "vq_grid16": lambda: fit_vq(grid16, flat, steps, cfg.vq.lr, cfg.seed, **opts, **patch),
        "plain_8x": lambda: _fit_plain(flat, flavor.vq.image_size, steps, cfg.vq.lr, cfg.seed, **opts, **patch),
    }  # fmt: skip
    if args.fits:
        unknown = sorted(set(args.fits.split(",")) - set(fits))
        if unknown:
            parser.error(f"unknown --fits {unknown}; valid: {list(fits)}")
        fits = {k: v for k, v in fits.items() if k in args.fits.split(",")}
    rows, report = [], {}
    for kind, fit in fits.items():
        start = time.perf_counter()
        module, _ = fit()
        seconds = time.perf_counter() - start
        figures = {"seconds_per_step": seconds / steps}
        for source, imgs in heldout.items():
            x = image_tensor(imgs, flavor.vq.image_size)
            recon = _roundtrip(kind, module, x)
            figures[f"psnr/{source}"] = psnr(F.mse_loss(recon, x).item())
            if source == "shapes":
                figures["shape_colour_kept"] = colour_kept(x, recon)
        report[kind] = figures
        psnrs = [f"{figures[f'psnr/{s}']:.1f}" for s in heldout]
        kept = f"{figures.get('shape_colour_kept', float('nan')):.3f}"
        rows.append([kind, kept, *psnrs, f"{figures['seconds_per_step']:.3f}"])
        print(f"{kind}: {json.dumps({k: round(v, 4) for k, v in figures.items()})}", flush=True)
    headers = ["fit", "colours kept", *(f"PSNR {s} dB" for s in heldout), "s/step"]
    print(f"\n{steps} steps, held out ({', '.join(f'{len(v)} {k}' for k, v in heldout.items())}):")
    print(text_table(headers, rows, align="l" + "r" * (len(headers) - 1)))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": steps, "fits": report}, indent=1))


if __name__ == "__main__":
    main()
