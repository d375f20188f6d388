"""Optional precompute of generation targets: VQ ids (Janus-Pro) or VAE latents (JanusFlow) into stage shards.

The frozen tokenizer / VAE runs in a Ray Data actor pool (one model per actor, GPU when present), one stage
shard per call: the shard's generation samples get ``vq.npy`` (int32 ids, row-major over the token grid) or
``latent.npy`` (the VAE posterior mean, unscaled: the trainer multiplies by the VAE scaling factor, as
``model.janusflow_task`` does with ``gen_latents``), and the shard is rewritten atomically. Training
uses those fields when present and encodes on the fly otherwise (:func:`generation_targets`, which both paths
share, so they give the same targets and the same loss).

Encoders are pluggable: a class whose ``__init__`` loads the frozen model (from ``path``, or a small seeded
random one for tests and the debug flavor) and whose ``encode(pixels)`` maps a (B, 3, H, W) float32 batch in
[-1, 1] to one array per image. The model package will provide the real builders.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.ray_session import ray_session
from data_prep.schema import GENERATION_TASKS, LATENT_EXT, VQ_EXT, Sample, decode_sample, encode_sample
from data_prep.shards import TarShardWriter, iter_tar_records

KINDS = ("none", "vq", "vae")


@dataclass(kw_only=True)
class PrecomputeConfig:
    kind: str = "none"
    """none, vq (Janus-Pro VQ ids -> vq.npy) or vae (JanusFlow VAE latents -> latent.npy)."""
    encoder_path: str | None = None
    """Frozen tokenizer/VAE (a saved JanusVQVAE / AutoencoderKL directory); unset: the tiny seeded debug one."""
    resolution: int = 384
    """Side of the square generation image fed to the encoder (short side resized, long side center-cropped)."""
    batch_size: int = 16
    """Images per encoder call."""
    num_actors: int = 1
    """Encoder actors in the Ray Data pool."""
    num_gpus_per_actor: float | None = None
    """GPUs per actor; unset: 1 when CUDA is available, else 0."""
    latent_dtype: str = "float32"
    """Stored latent dtype (float32 or float16)."""
    seed: int = 0
    """Initialisation seed of the debug encoder."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"precompute.kind must be one of {KINDS}, got {self.kind!r}")
        if self.resolution <= 0 or self.batch_size <= 0 or self.num_actors <= 0:
            raise ValueError("precompute.resolution, batch_size and num_actors must be positive")
        if self.latent_dtype not in ("float32", "float16"):
            raise ValueError(f"precompute.latent_dtype must be float32 or float16, got {self.latent_dtype!r}")


class Encoder(Protocol):
    field: str
    """The sample field it fills (VQ_EXT or LATENT_EXT)."""
    resolution: int

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]: ...


def generation_pixels(image: bytes, resolution: int) -> np.ndarray:
    """Generation preprocessing (Janus): short side to ``resolution``, center-crop, (3, H, W) float32 in [-1, 1].

    The same arithmetic as the trainer's ``model.collate.preprocess_generation`` (a test holds them equal).
    """
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 127.5 - 1.0)


class JanusVQEncoder:
    """Frozen Janus VQ tokenizer (transformers ``JanusVQVAE``): image -> int32 ids over its token grid."""

    field = VQ_EXT

    def __init__(self, path: str | None = None, *, resolution: int = 32, seed: int = 0, device: str | None = None):
        import torch
        from transformers.models.janus import JanusVQVAE, JanusVQVAEConfig

        self.resolution = resolution
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if path:
            model = JanusVQVAE.from_pretrained(path)
        else:
            torch.manual_seed(seed)
            model = JanusVQVAE(
                JanusVQVAEConfig(
                    embed_dim=8,
                    num_embeddings=64,
                    latent_channels=32,
                    base_channels=32,
                    channel_multiplier=[1, 1, 2],
                    num_res_blocks=1,
                    num_patches=4,
                    projection_dim=32,
                    image_token_embed_dim=32,
                )
            )
        self.model = model.eval().requires_grad_(False).to(self.device)

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model.encode(torch.from_numpy(pixels).to(self.device))
        ids = out.image_tokens.reshape(len(pixels), -1).to(torch.int32).cpu().numpy()
        return [np.ascontiguousarray(x) for x in ids]


class SDVAEEncoder:
    """Frozen VAE (diffusers ``AutoencoderKL``): image -> posterior mean (C, h, w), unscaled (see ``scale``)."""

    field = LATENT_EXT

    def __init__(
        self,
        path: str | None = None,
        *,
        resolution: int = 32,
        seed: int = 0,
        device: str | None = None,
        dtype: str = "float32",
    ):
        import torch
        from diffusers import AutoencoderKL

        self.resolution = resolution
        self.dtype = np.dtype(dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if path:
            model = AutoencoderKL.from_pretrained(path)
        else:
            torch.manual_seed(seed)
            model = AutoencoderKL(
                block_out_channels=(32, 32),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                latent_channels=4,
                norm_num_groups=32,
                layers_per_block=1,
                sample_size=resolution,
            )
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.scale = float(self.model.config.scaling_factor)

    def encode(self, pixels: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            dist = self.model.encode(torch.from_numpy(pixels).to(self.device)).latent_dist
            latent = dist.mean.float().cpu().numpy()
        return [np.ascontiguousarray(x, dtype=self.dtype) for x in latent]  # the VAE may return channels-last


ENCODERS: dict[str, type] = {"vq": JanusVQEncoder, "vae": SDVAEEncoder}


def encoder_kwargs(cfg: PrecomputeConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"path": cfg.encoder_path, "resolution": cfg.resolution, "seed": cfg.seed}
    if cfg.kind == "vae":
        kwargs["dtype"] = cfg.latent_dtype
    return kwargs


def needs_target(sample: Sample) -> bool:
    return sample.meta.task in GENERATION_TASKS and sample.image is not None


def encode_samples(samples: Sequence[Sample], encoder: Encoder, batch_size: int = 16) -> list[np.ndarray]:
    """Encode the images of ``samples`` (all must have one), in batches."""
    out: list[np.ndarray] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        pixels = np.stack([generation_pixels(s.image or b"", encoder.resolution) for s in chunk])
        out.extend(encoder.encode(pixels))
    return out


def generation_targets(samples: Sequence[Sample], encoder: Encoder, batch_size: int = 16) -> list[np.ndarray]:
    """The trainer's generation targets: the precomputed field when a sample has it, else encoded now."""
    attr = "vq" if encoder.field == VQ_EXT else "latent"
    missing = [i for i, s in enumerate(samples) if getattr(s, attr) is None]
    encoded = dict(zip(missing, encode_samples([samples[i] for i in missing], encoder, batch_size), strict=True))
    return [encoded[i] if i in encoded else getattr(s, attr) for i, s in enumerate(samples)]


def precompute_shard(path: Path, encoder: Encoder, batch_size: int = 16) -> int:
    """Add the encoder's field to every generation sample of one shard (rewritten atomically); returns count."""
    samples = [decode_sample(r) for r in iter_tar_records(path)]
    todo = [s for s in samples if needs_target(s)]
    attr = "vq" if encoder.field == VQ_EXT else "latent"
    for sample, target in zip(todo, encode_samples(todo, encoder, batch_size), strict=True):
        setattr(sample, attr, target)
    with TarShardWriter(path) as writer:
        for sample in samples:
            writer.write(encode_sample(sample))
    return len(todo)


class ShardPrecomputer:
    """Ray Data actor: loads the frozen encoder once, then precomputes whole shards (a batch of paths)."""

    def __init__(self, encoder_cls: type, encoder_kwargs: dict[str, Any], batch_size: int) -> None:
        self.encoder = encoder_cls(**encoder_kwargs)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [precompute_shard(Path(str(p)), self.encoder, self.batch_size) for p in batch["path"]]
        return {"path": batch["path"], "encoded": np.array(counts, dtype=np.int64)}


def run_precompute(
    paths: Sequence[Path],
    encoder_cls: type,
    encoder_kw: dict[str, Any],
    *,
    batch_size: int = 16,
    num_actors: int = 1,
    num_gpus_per_actor: float | None = None,
) -> dict[str, int]:
    """Precompute every shard in ``paths`` on a Ray Data actor pool; returns encoded samples per shard name."""
    import ray
    import torch

    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if torch.cuda.is_available() else 0.0
    with ray_session():
        ds = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=max(1, len(paths)))
        ds = ds.map_batches(
            ShardPrecomputer,
            fn_constructor_kwargs={"encoder_cls": encoder_cls, "encoder_kwargs": encoder_kw, "batch_size": batch_size},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor,
        )
        rows = ds.take_all()
    return {Path(str(r["path"])).name: int(r["encoded"]) for r in rows}


def precompute_config_encoder(cfg: PrecomputeConfig) -> tuple[type, dict[str, Any]]:
    """The encoder class and its constructor arguments for a config (kind must not be none)."""
    if cfg.kind not in ENCODERS:
        raise ValueError(f"precompute.kind {cfg.kind!r} has no encoder; choose one of {sorted(ENCODERS)}")
    return ENCODERS[cfg.kind], encoder_kwargs(cfg)
