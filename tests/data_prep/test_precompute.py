"""Precomputed generation targets (VQ ids, VAE latents): stored only on generation samples, the same targets and
the same loss as encoding on the fly, and the Ray Data actor pool writes the same bytes as a plain loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.precompute import (
    JanusVQEncoder,
    PrecomputeConfig,
    SDVAEEncoder,
    generation_pixels,
    generation_targets,
    precompute_shard,
    run_precompute,
)
from data_prep.schema import encode_sample
from data_prep.shards import read_samples, write_tar
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401 - session fixture
from tests.data_prep.mix_fixtures import make_sample, png

RES = 32


def write_stage_like_shard(path: Path, n: int = 6) -> Path:
    """Generation (t2i, class_label) and understanding (caption) and text samples mixed in one shard."""
    kinds = ["synthetic_aesthetic", "caption", "class_label", "text"]
    samples = [make_sample(f"src{i % 4}", kinds[i % 4], i) for i in range(n)]
    write_tar(path, (encode_sample(s) for s in samples))
    return path


@pytest.fixture(scope="module")
def vq() -> JanusVQEncoder:
    return JanusVQEncoder(resolution=RES, seed=0)


@pytest.fixture(scope="module")
def vae() -> SDVAEEncoder:
    return SDVAEEncoder(resolution=RES, seed=0)


def test_generation_pixels_match_the_trainer() -> None:
    from model.collate import preprocess_generation

    for seed, size in ((3, 16), (4, 40)):
        px = generation_pixels(png(seed, size=size), RES)  # 20x16 / 44x40 -> short side 32, center crop
        assert px.shape == (3, RES, RES) and px.dtype == np.float32
        assert -1.0 <= px.min() < px.max() <= 1.0
        assert np.array_equal(px, preprocess_generation(png(seed, size=size), RES).numpy())


def ce_loss(ids: list[np.ndarray]) -> torch.Tensor:
    """A simple image-token loss: a fixed next-id predictor over the codebook, cross-entropy on all ids."""
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64)
    x = torch.tensor(np.stack(ids), dtype=torch.long)
    logits = head(embed(x[:, :-1]))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))


def rf_loss(latents: list[np.ndarray]) -> torch.Tensor:
    """Rectified-flow MSE with fixed noise, t and a fixed linear velocity model."""
    x = torch.tensor(np.stack(latents), dtype=torch.float32)  # a torch-owned copy: same alignment both paths
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(x.shape, generator=g)
    t = torch.rand(len(x), 1, 1, 1, generator=g)
    zt = t * x + (1 - t) * z0
    torch.manual_seed(0)
    model = torch.nn.Conv2d(x.shape[1], x.shape[1], 1)
    return torch.nn.functional.mse_loss(model(zt), x - z0)


def test_vq_precompute_matches_on_the_fly(vq: JanusVQEncoder, tmp_path: Path) -> None:
    raw = write_stage_like_shard(tmp_path / "raw.tar")
    pre = shutil.copy(raw, tmp_path / "pre.tar")
    assert precompute_shard(Path(pre), vq) == 3  # the t2i and class_label samples
    stored = list(read_samples(pre))
    for s in stored:
        is_gen = s.meta.task in ("t2i", "class_label")
        assert (s.vq is not None) == is_gen and s.latent is None
        if is_gen:
            assert s.vq.dtype == np.int32 and s.vq.shape == ((RES // 4) ** 2,)
    gen_stored = [s for s in stored if s.vq is not None]
    gen_raw = [s for s in read_samples(raw) if s.meta.task in ("t2i", "class_label")]
    assert all(s.vq is None for s in gen_raw)
    from_disk, on_the_fly = generation_targets(gen_stored, vq), generation_targets(gen_raw, vq)
    assert all(np.array_equal(a, b) for a, b in zip(from_disk, on_the_fly, strict=True))
    assert ce_loss(from_disk).item() == ce_loss(on_the_fly).item()
    assert len({a.tobytes() for a in from_disk}) == 3  # different images, different ids


def test_vae_precompute_matches_on_the_fly(vae: SDVAEEncoder, tmp_path: Path) -> None:
    raw = write_stage_like_shard(tmp_path / "raw.tar")
    pre = shutil.copy(raw, tmp_path / "pre.tar")
    precompute_shard(Path(pre), vae)
    gen_stored = [s for s in read_samples(pre) if s.latent is not None]
    gen_raw = [s for s in read_samples(raw) if s.meta.task in ("t2i", "class_label")]
    assert len(gen_stored) == 3 and gen_stored[0].latent.shape == (4, RES // 2, RES // 2)
    from_disk, on_the_fly = generation_targets(gen_stored, vae), generation_targets(gen_raw, vae)
    assert all(np.array_equal(a, b) for a, b in zip(from_disk, on_the_fly, strict=True))
    assert rf_loss(from_disk).item() == rf_loss(on_the_fly).item()
    # Stored unscaled, as the trainer expects (it multiplies gen_latents by the VAE scaling factor).
    from model.janusflow_task import vae_encode

    pixels = torch.from_numpy(np.stack([generation_pixels(s.image, RES) for s in gen_raw]))
    scaled = vae_encode(vae.model, pixels).numpy()
    assert np.allclose(np.stack(from_disk) * vae.scale, scaled, atol=1e-6)


def test_precompute_is_deterministic(vq: JanusVQEncoder, tmp_path: Path) -> None:
    a = write_stage_like_shard(tmp_path / "a.tar")
    b = write_stage_like_shard(tmp_path / "b.tar")
    precompute_shard(a, vq)
    precompute_shard(b, JanusVQEncoder(resolution=RES, seed=0))
    assert a.read_bytes() == b.read_bytes()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="precompute.kind"):
        PrecomputeConfig(kind="vqgan")
    with pytest.raises(ValueError, match="latent_dtype"):
        PrecomputeConfig(kind="vae", latent_dtype="int8")


@pytest.mark.ray
def test_ray_actor_pool_writes_the_same_bytes(ray_local: None, vq: JanusVQEncoder, tmp_path: Path) -> None:  # noqa: F811
    paths = [write_stage_like_shard(tmp_path / f"s-{i}.tar", n=4 + i) for i in range(3)]
    local = [Path(shutil.copy(p, tmp_path / f"local-{i}.tar")) for i, p in enumerate(paths)]
    for p in local:
        precompute_shard(p, vq)
    counts = run_precompute(paths, JanusVQEncoder, {"resolution": RES, "seed": 0}, num_actors=1, num_gpus_per_actor=0)
    assert counts == {"s-0.tar": 2, "s-1.tar": 3, "s-2.tar": 3}
    for p, q in zip(paths, local, strict=True):
        assert p.read_bytes() == q.read_bytes()
