"""Where the debug VQ loses the toy shapes' colours: the codebook, or the encoder/decoder architecture.

    .venv/bin/python benchmarks/vq_colour.py --toyworld outputs/toyworld [--steps 300] [--max-images N] [--json F]
    .venv/bin/python benchmarks/vq_colour.py --toyworld outputs/toyworld --export-bundle toy.pt   # then, on a GPU:
    python benchmarks/vq_colour.py --bundle toy.pt --device cuda --workers 8 --seeds 0,1,2 --steps 300,1000,3000

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
- ``vq_torch_init``: the shipped VQ fit from PyTorch's default init instead of transformers' normal(0, 0.02)
  (still a stock ``JanusVQVAE``: only the starting weights differ);
- ``vq_torch_init_no_out_norm``: both changes.

Measured on one H200 (8 fits at a time, 0.04 s/step each), 3 seeds, 300 steps: ``vq`` 0.175-0.275,
``vq_no_codebook`` 0.175-0.18, ``vq_no_out_norm`` 0.18-0.33, ``vq_torch_init`` 0.18-0.27,
``vq_torch_init_no_out_norm`` 0.33-0.425, ``plain_8x`` 0.18-0.495, ``kl_8x`` 0.33-0.955; the learning rate
(5e-4, 1e-3, 4e-3) does not lift ``vq`` (0.175-0.335). Longer fits do: ``vq`` 3000 steps 0.915 (seed 0, PSNR
shapes 24.2 dB); ``vq_torch_init_no_out_norm`` 1000 steps 0.415 / 0.785 / 0.915, 3000 steps 0.995 (seed 1;
seed 0 diverged). The debug VQ can keep the colours: it needs about ten times the recipe's steps, which is
what 2 CPU cores cannot give it inside the demo's budget (0.45-1 s/step there).

and prints, on held-out images (the eval split), the fraction of shapes whose colour survives the round trip
(``judge_colour``), PSNR per source and seconds per step. If ``vq_no_codebook`` loses the colours as ``vq``
does, a bigger codebook will not bring them back. ``--fits`` picks some of them (default: the first seven).

``--steps`` and ``--lr`` take comma-separated lists and ``--seeds`` several seeds: every fit runs for each
combination and the table gives the mean and the range over seeds (single fits vary by up to 0.3 here, so
compare ranges). ``--device cuda`` fits on a GPU and ``--workers N`` runs N fits at once, each in its own
process; round trips are measured on the CPU. ``--export-bundle`` writes the recipe's images and
options to one file so that ``--bundle`` runs where there is no toy world (a GPU machine with torch,
transformers, diffusers and omegaconf only). A fit that fails is reported and the others go on; the exit
status is then non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import model.fit_tokenizers as fit_tokenizers
from common.tables import text_table
from model.fit_tokenizers import fit_vae, fit_vq, image_tensor, psnr, vq_reconstruct
from model.flavors import get_flavor

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "data" / "fit_tokenizers_toy.yaml"


@contextlib.contextmanager
def _patched_vq(edit: Callable[[nn.Module], None]) -> Iterator[None]:
    """``fit_vq`` builds VQs changed by ``edit`` (diagnostics: the stock ``JanusVQVAE`` cannot be built so)."""
    build = fit_tokenizers.build_vq

    def build_edited(flavor):
        vq = build(flavor)
        edit(vq)
        return vq

    fit_tokenizers.build_vq = build_edited
    try:
        yield
    finally:
        fit_tokenizers.build_vq = build


def _drop_decoder_out_norm(vq: nn.Module) -> None:
    """The decoder ends without its last GroupNorm (conv_out reads SiLU(h) directly)."""
    vq.decoder.norm_out = nn.Identity()


def _torch_default_init(vq: nn.Module) -> None:
    """Convolutions and linear layers re-drawn with PyTorch's default (Kaiming-uniform) init instead of
    transformers' normal(0, 0.02): the init the plain autoencoder has."""
    for module in vq.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.reset_parameters()


def _fit_edited(edit: Callable[[nn.Module], None], *args, **kwargs):
    with _patched_vq(edit):
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
               foreground_weight: float, patch_colour_weight: float,
               device: str = "cpu") -> tuple[PlainAutoencoder, None]:  # fmt: skip
    """``fit_vq``'s loop and loss (``fit_tokenizers._recon_loss``) on a ``PlainAutoencoder``."""
    torch.manual_seed(seed)
    x = image_tensor(images, size).to(device)
    net = PlainAutoencoder().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for idx in fit_tokenizers._batches(len(x), batch_size, steps, seed):
        loss, _ = fit_tokenizers._recon_loss(net(x[idx]), x[idx], foreground_weight, 8, patch_colour_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False).cpu(), None


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


FITS = [
    "vq",
    "vq_no_codebook",
    "kl_8x",
    "kl_8x_vq_widths",
    "vq_no_out_norm",
    "vq_grid16",
    "plain_8x",
    "vq_torch_init",
    "vq_torch_init_no_out_norm",
]


@dataclass(frozen=True)
class Data:
    """What every fit reads: the recipe's training images and options, and the held-out images."""

    images: list[bytes]
    heldout: dict[str, list[bytes]]
    flavor: str
    seed: int
    vq: dict[str, float]


def load_data(args: argparse.Namespace) -> Data:
    if args.bundle:
        raw = torch.load(args.bundle, weights_only=True)  # plain containers of bytes, str and numbers
        fields = set(Data.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) != fields:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise SystemExit(f"{args.bundle}: not a --export-bundle file (expected keys {sorted(fields)}, got {got})")
        return Data(**raw)
    from common.config import load_config
    from training.tokenizers import FitTokenizersConfig, collect_heldout, collect_images

    limit = [f"max_images_per_source={args.max_images}", f"heldout_images={args.max_images}"] if args.max_images else []
    cfg = load_config(FitTokenizersConfig, RECIPE, [f"toyworld_dir={args.toyworld}", *limit])
    images = collect_images(cfg)
    vq = {k: getattr(cfg.vq, k) for k in ("steps", "lr", "batch_size", "foreground_weight", "patch_colour_weight")}
    flat = [img for imgs in images.values() for img in imgs]
    return Data(images=flat, heldout=collect_heldout(cfg), flavor=cfg.flavor, seed=cfg.seed, vq=vq)


def run_fit(data: Data, kind: str, steps: int, lr: float, seed: int, device: str) -> dict[str, float]:
    """One fit on ``device``; its held-out figures (round trips on the CPU)."""
    from training.tokenizers import colour_kept

    flavor = get_flavor(data.flavor)
    wide = get_flavor(data.flavor)  # one more level: the VAE's latent grid becomes the VQ's
    wide.flow.vae_block_out_channels = [*wide.flow.vae_block_out_channels, wide.flow.vae_block_out_channels[-1]]
    vq_widths = get_flavor(data.flavor)  # the diffusers blocks at the VQ's widths and norm groups
    vq_widths.flow.vae_block_out_channels = [flavor.vq.base_channels * m for m in flavor.vq.channel_multiplier]
    vq_widths.flow.vae_norm_num_groups = 32  # transformers' JanusVQVAE hard-codes 32
    grid16 = get_flavor(data.flavor)  # one level fewer: a 16x16 code grid
    grid16.vq.channel_multiplier = grid16.vq.channel_multiplier[:-1]
    flat, o = data.images, data.vq
    opts = {"batch_size": int(o["batch_size"]), "foreground_weight": o["foreground_weight"], "device": device}
    patch = {"patch_colour_weight": o["patch_colour_weight"]}
    both = lambda vq: (_torch_default_init(vq), _drop_decoder_out_norm(vq))  # noqa: E731
    fits = {
        "vq": lambda: fit_vq(flavor, flat, steps, lr, seed, **opts, **patch),
        "vq_no_codebook": lambda: fit_vq(flavor, flat, steps, lr, seed, **opts, **patch, quantize=False),
        "kl_8x": lambda: fit_vae(wide, flat, steps, lr, seed, **opts),
        "kl_8x_vq_widths": lambda: fit_vae(vq_widths, flat, steps, lr, seed, **opts),
        "vq_no_out_norm": lambda: _fit_edited(_drop_decoder_out_norm, flavor, flat, steps, lr, seed, **opts, **patch),
        "vq_grid16": lambda: fit_vq(grid16, flat, steps, lr, seed, **opts, **patch),
        "plain_8x": lambda: _fit_plain(flat, flavor.vq.image_size, steps, lr, seed, **opts, **patch),
        "vq_torch_init": lambda: _fit_edited(_torch_default_init, flavor, flat, steps, lr, seed, **opts, **patch),
        "vq_torch_init_no_out_norm": lambda: _fit_edited(both, flavor, flat, steps, lr, seed, **opts, **patch),
    }  # fmt: skip
    assert list(fits) == FITS
    start = time.perf_counter()
    module, _ = fits[kind]()
    seconds = time.perf_counter() - start
    figures = {"seconds_per_step": seconds / steps}
    for source, imgs in data.heldout.items():
        x = image_tensor(imgs, flavor.vq.image_size)
        recon = _roundtrip(kind, module, x)
        figures[f"psnr/{source}"] = psnr(F.mse_loss(recon, x).item())
        if source == "shapes":
            figures["shape_colour_kept"] = colour_kept(x, recon)
    return figures


_WORKER: dict[str, object] = {}


def _init_worker(data: Data, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    _WORKER["data"] = data


def _run_job(job: tuple[str, int, float, int, str], data: Data | None = None) -> dict[str, float] | str:
    """A fit's figures, or the error that stopped it (a sweep reports it and goes on with the other fits)."""
    try:
        return run_fit(data or _WORKER["data"], *job)
    except Exception as exc:  # reported per fit; the script exits non-zero at the end
        return f"{type(exc).__name__}: {exc}"


def _floats(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toyworld", help="an existing toy world (python -m pipelines.toyworld)")
    parser.add_argument("--bundle", help="read the images and recipe from a --export-bundle file instead")
    parser.add_argument("--export-bundle", help="write the toy world's images and recipe to this file and stop")
    parser.add_argument("--steps", default="0", help="fit steps, comma-separated (0 = the recipe's VQ steps)")
    parser.add_argument("--lr", default="0", help="learning rates, comma-separated (0 = the recipe's VQ lr)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the recipe's)")
    parser.add_argument("--max-images", type=int, default=0, help="images per source (0 = the recipe's)")
    parser.add_argument("--fits", default="", help="comma-separated fits to run (default: the first seven)")
    parser.add_argument("--device", default="cpu", help="where the fits run (cpu, cuda)")
    parser.add_argument("--workers", type=int, default=1, help="fits run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    if bool(args.toyworld) == bool(args.bundle):
        parser.error("give exactly one of --toyworld and --bundle")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = load_data(args)
    if args.export_bundle:
        torch.save(vars(data), args.export_bundle)
        print(f"wrote {len(data.images)} training and {sum(map(len, data.heldout.values()))} held-out images "
              f"to {args.export_bundle}")  # fmt: skip
        return
    names = args.fits.split(",") if args.fits else FITS[:7]
    unknown = sorted(set(names) - set(FITS))
    if unknown:
        parser.error(f"unknown --fits {unknown}; valid: {FITS}")
    step_list = [v or int(data.vq["steps"]) for v in _floats(args.steps, int)]
    lr_list = [v or float(data.vq["lr"]) for v in _floats(args.lr, float)]
    seeds = _floats(args.seeds, int) or [data.seed]

    def key(kind: str, steps: int, lr: float) -> str:
        return kind + (f"@{steps}" if len(step_list) > 1 else "") + (f"_lr{lr:g}" if len(lr_list) > 1 else "")

    jobs = [(k, n, lr, sd, args.device) for k in names for n in step_list for lr in lr_list for sd in seeds]
    runs, grouped, failed = [], {}, []
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, ctx, _init_worker, (data, args.threads)))
            results = pool.map(_run_job, jobs)
        else:
            results = (_run_job(job, data) for job in jobs)
        for (kind, steps, lr, seed, _), figures in zip(jobs, results, strict=True):  # each as it finishes, in order
            if isinstance(figures, str):
                failed.append({"fit": kind, "steps": steps, "lr": lr, "seed": seed, "error": figures})
                print(f"{key(kind, steps, lr)} seed {seed}: FAILED {figures}", flush=True)
                continue
            runs.append({"fit": kind, "steps": steps, "lr": lr, "seed": seed, **figures})
            grouped.setdefault(key(kind, steps, lr), []).append(figures)
            shown = json.dumps({k: round(v, 4) for k, v in figures.items()})
            print(f"{key(kind, steps, lr)} seed {seed}: {shown}", flush=True)
    report, rows = {}, []
    for name, group in grouped.items():
        mean = {k: sum(g[k] for g in group) / len(group) for k in group[0]}
        kept = [g["shape_colour_kept"] for g in group if "shape_colour_kept" in g]
        if kept:
            mean |= {"shape_colour_kept_min": min(kept), "shape_colour_kept_max": max(kept)}
        report[name] = mean
        spread = f" ({min(kept):.3f}-{max(kept):.3f})" if len(kept) > 1 else ""
        shown = f"{mean['shape_colour_kept']:.3f}{spread}" if kept else "nan"
        psnrs = [f"{mean[f'psnr/{s}']:.1f}" for s in data.heldout]
        rows.append([name, shown, *psnrs, f"{mean['seconds_per_step']:.3f}"])
    headers = ["fit", "colours kept", *(f"PSNR {s} dB" for s in data.heldout), "s/step"]
    held = ", ".join(f"{len(v)} {k}" for k, v in data.heldout.items())
    print(f"\nsteps {step_list}, lr {lr_list}, seeds {seeds} (mean, and range over seeds), held out ({held}):")
    print(text_table(headers, rows, align="l" + "r" * (len(headers) - 1)))
    if args.json:
        summary = {"steps": step_list[0] if len(step_list) == 1 else step_list, "seeds": seeds, "device": args.device}
        Path(args.json).write_text(json.dumps({**summary, "fits": report, "runs": runs, "failed": failed}, indent=1))
    if failed:
        sys.exit(f"{len(failed)} of {len(jobs)} fits failed (above)")


if __name__ == "__main__":
    main()
