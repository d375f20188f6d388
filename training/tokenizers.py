"""Fitting the debug flavor's generation tokenizers (and pre-fitting its SigLIP) on toy or curated images.

Reads images from the toy world's train splits (``digits``, ``shapes``, optionally ``photos``) and/or any
curated shards folder (every ``*.tar`` under it), fits the Janus-Pro VQ and the JanusFlow VAE
(``model.fit_tokenizers``) and writes ``{out_dir}/vq/`` and ``{out_dir}/vae/`` (``save_pretrained``,
safetensors), ``{out_dir}/fit_tokenizers.json`` (PSNR before/after, codebook use, shape colours kept) and
reconstruction grids (``recon_vq.png``, ``recon_vae.png``: originals above reconstructions). Training picks
them up with ``model.vq_path={out_dir}/vq`` and ``model.vae_path={out_dir}/vae``. The job is
``pipelines.fit_tokenizers``.

With ``vision.enabled`` it also pre-fits the flavor's SigLIP contrastively (``model.fit_vision``) on the toy
world's training images and their texts, writes ``{out_dir}/vision/`` (for ``model.vision_path``, both
families) and reports held-out retrieval per source (``vision/heldout_top1/<source>`` against
``vision/heldout_chance/<source>``).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import save_resolved, to_flat_dict
from common.io import atomic_write_json
from common.tracking import TrackingConfig, build_tracker
from evaluation.judges import ARTEFACT_MAX, artefact_peak, judge_colour
from model.fit_tokenizers import fit_vae, fit_vq, image_tensor, psnr, vq_reconstruct
from model.fit_vision import Pair, fit_vision, qa_tokens, retrieval_top1, words
from model.flavors import get_flavor
from model.inference import image_grid, to_pil

logger = logging.getLogger("training.tokenizers")

REPORT_FILE = "fit_tokenizers.json"
COLOUR_KEPT_MIN = 0.95
"""Held-out shapes whose colour must survive the round trip; below it the job warns."""
TOY_SOURCES = ("digits", "shapes", "photos")


@dataclass(kw_only=True)
class FitOptions:
    """Optimisation of one tokenizer."""

    enabled: bool = True
    """Fit this tokenizer (False skips it)."""
    steps: int = 300
    """Optimizer steps."""
    lr: float = 2e-3
    """Adam learning rate."""
    batch_size: int = 16
    """Images per step."""
    foreground_weight: float = 4.0
    """Extra reconstruction weight on pixels that differ from the image's border colour (0 = plain loss)."""
    patch_colour_weight: float = 8.0
    """VQ only: weight of the L2 loss on patch-mean colours (one patch per code); ignored for the VAE, whose
    held-out shape colours it lowered (60% kept against 78% without, 300 steps on the toy world)."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"FitOptions.steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"FitOptions.lr must be positive, got {self.lr}")
        if self.foreground_weight < 0 or self.patch_colour_weight < 0:
            raise ValueError(
                f"FitOptions.foreground_weight and patch_colour_weight must be >= 0, got "
                f"{self.foreground_weight}, {self.patch_colour_weight}"
            )


VISION_SOURCES = ("digits", "shapes", "charts_docs", "photos")


@dataclass(kw_only=True)
class VisionFitOptions:
    """The understanding encoder's contrastive pre-fit (``model.fit_vision``): the debug analogue of the
    pretrained SigLIP the papers start from. Off by default: real flavors load a pretrained one."""

    enabled: bool = False
    """Fit the flavor's SigLIP on the toy world's image-text pairs and write {out_dir}/vision/."""
    sources: list[str] = field(default_factory=lambda: list(VISION_SOURCES))
    """Toy-world sources whose training images and texts it fits on."""
    max_pairs_per_source: int = 2000
    """Seeded subset of at most this many pairs per source."""
    steps: int = 800
    """Optimizer steps (each batch draws equally from every source)."""
    lr: float = 1e-3
    """AdamW peak learning rate (warm-up, then cosine to 0)."""
    batch_size: int = 64
    """Pairs per step; every image is contrasted with every text of its batch."""
    text_dim: int = 128
    """Width of the bag-of-words text tower (thrown away after the fit)."""

    def __post_init__(self) -> None:
        bad = sorted(set(self.sources) - set(VISION_SOURCES))
        if bad:
            raise ValueError(f"vision.sources: unknown {bad}; valid: {list(VISION_SOURCES)}")
        if self.enabled and not self.sources:
            raise ValueError("vision.sources is empty but vision.enabled is true")
        for name in ("max_pairs_per_source", "steps", "batch_size", "text_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vision.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"vision.lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class FitTokenizersConfig:
    out_dir: str = "outputs/tokenizers"
    """Writes {out_dir}/vq/, {out_dir}/vae/, fit_tokenizers.json and reconstruction grids."""
    flavor: str = "debug"
    """Model flavor whose VQ/VAE dimensions are fitted."""
    toyworld_dir: str | None = "outputs/toyworld"
    """Toy world root; images come from {source}/train of each of toy_sources. None = not used."""
    toy_sources: list[str] = field(default_factory=lambda: ["digits", "shapes"])
    """Toy-world sources to read (digits, shapes, photos)."""
    shards_dir: str | None = None
    """Curated or stage shards folder: the images of every *.tar under it. None = not used."""
    max_images_per_source: int = 600
    """Seeded subset of at most this many images per source (shards_dir counts as one source)."""
    heldout_images: int = 200
    """After fitting, measure on at most this many held-out images ({source}/eval) per toy source: PSNR, shape
    colours kept, fixed-position artefact. 0 = skip."""
    seed: int = 0
    """Seeds the subset, the initialisation and the batches."""
    threads: int = 2
    """torch intra-op threads (CPU)."""
    device: str = "cpu"
    """Where the VQ and VAE fits run: "cpu", or "cuda" / "cuda:N" (the fitted tokenizers are saved and measured
    on the CPU either way). Measured for the debug VQ: 0.04-0.05 s/step on one H200 shared by 8-12 fits at once,
    against 0.45-1 s/step on 2 CPU cores. The vision pre-fit stays on the CPU."""
    vq: FitOptions = field(default_factory=FitOptions)
    """Janus-Pro VQ fitting."""
    vae: FitOptions = field(default_factory=FitOptions)
    """JanusFlow VAE fitting."""
    vision: VisionFitOptions = field(default_factory=VisionFitOptions)
    """Understanding encoder (SigLIP) pre-fit, both families; needs toyworld_dir."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the run is recorded."""

    def __post_init__(self) -> None:
        get_flavor(self.flavor)
        bad = sorted(set(self.toy_sources) - set(TOY_SOURCES))
        if bad:
            raise ValueError(f"toy_sources: unknown {bad}; valid: {list(TOY_SOURCES)}")
        if self.toyworld_dir is None and self.shards_dir is None:
            raise ValueError("toyworld_dir and shards_dir are both None: no images to fit on")
        if self.max_images_per_source <= 0:
            raise ValueError(f"max_images_per_source must be positive, got {self.max_images_per_source}")
        if self.heldout_images < 0:
            raise ValueError(f"heldout_images must be >= 0, got {self.heldout_images}")
        if self.vision.enabled and self.toyworld_dir is None:
            raise ValueError("vision.enabled needs toyworld_dir: the pre-fit reads the toy world's texts")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device: {self.device!r} is not a torch device ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: {self.device!r}: fits run on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} asked for, but torch sees no CUDA device here")


def _toy_images(root: Path, source: str, split_name: str = "train") -> list[bytes]:
    split = root / source / split_name
    if source == "digits":
        return [p.read_bytes() for p in sorted((split / "images").glob("*.png"))]
    if source == "shapes":
        return [p.read_bytes() for p in sorted(split.glob("*.png"))]
    import pyarrow.parquet as pq

    return list(pq.read_table(split / "photos.parquet", columns=["image"]).column("image").to_pylist())


def _toy_pairs(root: Path, source: str, split_name: str = "train") -> list[Pair]:
    """A toy source's images with their texts: digit prompts, shape and photo captions, and the doc type plus
    the question/answer pairs of charts and documents."""
    split = root / source / split_name
    if source == "digits":
        rows = [json.loads(line) for line in (split / "manifest.jsonl").read_text().splitlines() if line.strip()]
        return [Pair((split / r["image"]).read_bytes(), tuple(words(r["prompt"])), source) for r in rows]
    if source == "shapes":
        return [
            Pair(p.read_bytes(), tuple(words(p.with_suffix(".txt").read_text())), source)
            for p in sorted(split.glob("*.png"))
        ]
    if source == "photos":
        import pyarrow.parquet as pq

        table = pq.read_table(split / "photos.parquet", columns=["image", "caption"]).to_pylist()
        return [Pair(r["image"], tuple(words(r["caption"])), source) for r in table]
    import webdataset as wds

    out = []
    for tar in sorted(split.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            if "png" not in sample or "json" not in sample:
                raise ValueError(
                    f"{tar}: sample {sample.get('__key__')!r} lacks a png image or its json (has "
                    f"{sorted(k for k in sample if not k.startswith('__'))})"
                )
            meta = json.loads(sample["json"])
            tokens = (meta.get("doc_type", "doc"), *qa_tokens(meta.get("conversation", [])))
            out.append(Pair(sample["png"], tokens, source))
    return out


def _shard_images(root: Path) -> list[bytes]:
    import webdataset as wds

    out = []
    for tar in sorted(root.rglob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            data = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
            if data is not None:
                out.append(data)
    return out


def collect_images(cfg: FitTokenizersConfig) -> dict[str, list[bytes]]:
    """Per source, a seeded subset of its training images (encoded bytes)."""
    found: dict[str, list[bytes]] = {}
    if cfg.toyworld_dir is not None:
        for source in cfg.toy_sources:
            found[source] = _toy_images(Path(cfg.toyworld_dir), source)
    if cfg.shards_dir is not None:
        found["shards"] = _shard_images(Path(cfg.shards_dir))
    for name, images in found.items():
        if not images:
            raise FileNotFoundError(f"fit_tokenizers: no images found for {name}")
        random.Random(f"{cfg.seed}:{name}").shuffle(images)
        found[name] = images[: cfg.max_images_per_source]
    return found


def collect_heldout(cfg: FitTokenizersConfig) -> dict[str, list[bytes]]:
    """Per toy source, at most ``heldout_images`` of its eval split (never fitted on); empty when skipped."""
    if cfg.toyworld_dir is None or cfg.heldout_images == 0:
        return {}
    root = Path(cfg.toyworld_dir)
    found = {s: _toy_images(root, s, "eval") for s in cfg.toy_sources if (root / s / "eval").is_dir()}
    return {s: imgs[: cfg.heldout_images] for s, imgs in found.items() if imgs}


@torch.no_grad()
def roundtrip(kind: str, tokenizer: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Pixels through the fitted tokenizer and back (VQ codes; VAE posterior mean), in [-1, 1]."""
    out = []
    for chunk in x.split(batch):
        if kind == "vq":
            out.append(vq_reconstruct(tokenizer, chunk)[0].clamp(-1, 1))
        else:
            out.append(tokenizer.decode(tokenizer.encode(chunk).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def recon_grid(kind: str, tokenizer: torch.nn.Module, x: torch.Tensor):
    """Originals above their reconstructions."""
    return image_grid([to_pil(p) for p in torch.cat([x, roundtrip(kind, tokenizer, x)])], cols=len(x))


def colour_kept(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of images whose judged dominant colour (``judge_colour``) is the same after the round trip."""
    same = [judge_colour(to_pil(a)) == judge_colour(to_pil(b)) for a, b in zip(x, recon, strict=True)]
    return sum(same) / len(same)


def position_bias(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[H, W]: |mean reconstruction - mean original| per position, in [0, 1] intensity (largest channel).

    Errors that follow the content average out over many images; a tokenizer that paints the same thing at
    the same place in every image (a decoder bias, a code that is always picked) does not.
    """
    return ((recon.mean(0) - x.mean(0)).abs().amax(0) / 2).float()


def heldout_metrics(kind: str, tokenizer: torch.nn.Module, images: dict[str, list[bytes]], size: int):
    """Per held-out source: PSNR and artefact peak; for shapes, the fraction whose colour is kept."""
    metrics: dict[str, float] = {}
    for source, imgs in images.items():
        x = image_tensor(imgs, size)
        recon = roundtrip(kind, tokenizer, x)
        metrics[f"{kind}/heldout_psnr/{source}"] = psnr(F.mse_loss(recon, x).item())
        metrics[f"{kind}/artefact_peak/{source}"] = artefact_peak(x, recon)
        if source == "shapes":
            metrics[f"{kind}/shape_colour_kept"] = colour_kept(x, recon)
    return metrics


def warn_if_short(kind: str, metrics: dict[str, float]) -> list[str]:
    """Log (and return) a warning for each held-out figure short of what the toy demo needs."""
    short = []
    kept = metrics.get(f"{kind}/shape_colour_kept")
    if kept is not None and kept < COLOUR_KEPT_MIN:
        short.append(f"{kind}: shape colour kept on {kept:.0%} of held-out shapes (< {COLOUR_KEPT_MIN:.0%})")
    for key, value in metrics.items():
        if key.startswith(f"{kind}/artefact_peak/") and value > ARTEFACT_MAX:
            short.append(
                f"{kind}: fixed-position artefact on held-out {key.rsplit('/', 1)[1]}: {value:.2f} > {ARTEFACT_MAX}"
            )
    for line in short:
        logger.warning("%s", line)
    return short


def fit_one(
    kind: str, cfg: FitTokenizersConfig, images: dict[str, list[bytes]], heldout: dict[str, list[bytes]], tracker
) -> dict[str, float]:
    opts = cfg.vq if kind == "vq" else cfg.vae
    flavor = get_flavor(cfg.flavor)
    every = max(1, opts.steps // 20)

    def log(step: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == opts.steps:
            tracker.log_metrics(metrics, step=step)

    flat = [img for imgs in images.values() for img in imgs]
    kwargs = {"batch_size": opts.batch_size, "foreground_weight": opts.foreground_weight, "log": log}
    kwargs["device"] = cfg.device
    if kind == "vq":
        colour = opts.patch_colour_weight
        module, stats = fit_vq(flavor, flat, opts.steps, opts.lr, cfg.seed, patch_colour_weight=colour, **kwargs)
    else:
        module, stats = fit_vae(flavor, flat, opts.steps, opts.lr, cfg.seed, **kwargs)
    out = Path(cfg.out_dir)
    module.save_pretrained(out / kind, safe_serialization=True)
    size = flavor.vq.image_size if kind == "vq" else flavor.flow.image_size
    source = heldout or images  # the grid shows held-out images where there are some
    shown = image_tensor([imgs[i] for imgs in source.values() for i in range(min(6, len(imgs)))], size)
    grid_path = out / f"recon_{kind}.png"
    recon_grid(kind, module, shown).save(grid_path, format="PNG")
    tracker.log_artifact(grid_path)
    metrics = {**stats.as_metrics(kind), **heldout_metrics(kind, module, heldout, size)}
    tracker.log_metrics(metrics)
    logger.info(
        "%s: %d steps in %.0fs on %d images: PSNR %.1f -> %.1f dB %s -> %s",
        kind, stats.steps, stats.seconds, len(flat), stats.psnr_before, stats.psnr_after, stats.extra, out / kind,
    )  # fmt: skip
    logger.info(
        "%s held out: %s",
        kind,
        {k: round(v, 3) for k, v in metrics.items() if "heldout" in k or "kept" in k or "artefact" in k},
    )
    warn_if_short(kind, metrics)
    return metrics


def collect_pairs(cfg: FitTokenizersConfig, split_name: str) -> list[Pair]:
    """The vision pre-fit's pairs: a seeded subset per source of the train split, or at most
    ``heldout_images`` per source of the eval split."""
    root, out = Path(cfg.toyworld_dir or ""), []
    for source in cfg.vision.sources:
        if not (root / source / split_name).is_dir():
            if split_name == "train":
                raise FileNotFoundError(f"fit_tokenizers: vision source {source!r} has no {root / source / 'train'}")
            continue
        pairs = _toy_pairs(root, source, split_name)
        if split_name == "train":
            if not pairs:
                raise FileNotFoundError(f"fit_tokenizers: no image-text pairs in {root / source / 'train'}")
            random.Random(f"{cfg.seed}:vision:{source}").shuffle(pairs)
            out += pairs[: cfg.vision.max_pairs_per_source]
        else:
            out += pairs[: cfg.heldout_images]
    return out


def fit_vision_tower(cfg: FitTokenizersConfig, tracker) -> dict[str, float]:
    """Fit, save {out_dir}/vision/ and measure held-out retrieval: per source, how often an eval image's own
    text is the nearest of that source's distinct eval texts (for digits: zero-shot classification)."""
    opts, flavor = cfg.vision, get_flavor(cfg.flavor)
    pairs, heldout = collect_pairs(cfg, "train"), collect_pairs(cfg, "eval")
    every = max(1, opts.steps // 20)

    def log(step: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == opts.steps:
            tracker.log_metrics(metrics, step=step)

    vision, text, stats = fit_vision(
        flavor, pairs, opts.steps, opts.lr, cfg.seed, batch_size=opts.batch_size, text_dim=opts.text_dim, log=log
    )
    vision.save_pretrained(Path(cfg.out_dir) / "vision", safe_serialization=True)
    metrics = {f"vision/{k}": v for k, v in stats.items()}
    metrics.update({f"vision/pairs/{s}": float(sum(p.source == s for p in pairs)) for s in opts.sources})
    for source in opts.sources:
        own = [p for p in heldout if p.source == source]
        if own:
            top1, chance = retrieval_top1(vision, text, own, flavor.vision.image_size)
            metrics[f"vision/heldout_top1/{source}"] = top1
            metrics[f"vision/heldout_chance/{source}"] = chance
    tracker.log_metrics(metrics)
    logger.info(
        "vision: %d steps in %.0fs on %d pairs, loss %.2f -> %.2f; held-out top-1 (chance) %s -> %s",
        opts.steps, stats["seconds"], len(pairs), stats["loss_first"], stats["loss_last"],
        {s: f"{metrics[f'vision/heldout_top1/{s}']:.2f} ({metrics[f'vision/heldout_chance/{s}']:.3f})"
         for s in opts.sources if f"vision/heldout_top1/{s}" in metrics},
        Path(cfg.out_dir) / "vision",
    )  # fmt: skip
    return metrics


@dataclass(kw_only=True)
class TokenizerFitResult:
    """What a fit wrote: the saved tokenizers and the figures of ``fit_tokenizers.json``."""

    out_dir: Path
    paths: dict[str, Path]
    """Tokenizer kind (``vq``, ``vae``, ``vision``: the pre-fitted SigLIP) -> its ``save_pretrained`` folder;
    only the fitted kinds."""
    metrics: dict[str, float]
    """Images per source, PSNR before/after, codebook use, shape colours kept."""


def run_fit_tokenizers(cfg: FitTokenizersConfig) -> TokenizerFitResult:
    """Fit the enabled tokenizers, save them under out_dir and record the MLflow child run ``fit_tokenizers``."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    out = Path(cfg.out_dir)
    save_resolved(cfg, out)
    images, heldout = collect_images(cfg), collect_heldout(cfg)
    metrics: dict[str, float] = {f"images/{k}": float(len(v)) for k, v in images.items()}
    metrics.update({f"heldout_images/{k}": float(len(v)) for k, v in heldout.items()})
    kinds = [kind for kind in ("vq", "vae") if getattr(cfg, kind).enabled]
    with build_tracker(cfg.tracking, "fit_tokenizers", jsonl_path=out / "metrics.jsonl") as tracker:
        tracker.log_params(to_flat_dict(cfg))
        for kind in kinds:
            metrics.update(fit_one(kind, cfg, images, heldout, tracker))
        if cfg.vision.enabled:
            metrics.update(fit_vision_tower(cfg, tracker))
            kinds.append("vision")
        atomic_write_json(out / REPORT_FILE, metrics)
        tracker.log_artifact(out / REPORT_FILE)
        tracker.log_artifact(out / "config.resolved.yaml")
    return TokenizerFitResult(out_dir=out, paths={kind: out / kind for kind in kinds}, metrics=metrics)
