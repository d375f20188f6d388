"""Fitting the debug VQ and VAE on toy images really reduces reconstruction error; the trainer picks them up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data_prep import toy_render
from evaluation.judges import ARTEFACT_MAX, artefact_peak
from model.build import ModelConfig, build_model, build_task
from model.fit_tokenizers import fit_vae, fit_vq, image_tensor, vq_reconstruct
from model.janus_pro import holds_vq, load_vq
from model.janusflow_task import load_vae
from training.tokenizers import colour_kept, warn_if_short


@pytest.fixture(scope="module")
def toy_images() -> list[bytes]:
    digits = load_digits()
    rng = np.random.default_rng(0)
    out = [toy_render.encode_image(toy_render.render_digit(digits.data[i], 64), "png") for i in range(24)]
    out += [toy_render.encode_image(toy_render.render_shapes(rng, 64, 2)[0], "png") for _ in range(24)]
    return out


@pytest.fixture(scope="module")
def fitted_vq(toy_images, debug_flavor):
    return fit_vq(debug_flavor, toy_images, steps=70, lr=2e-3, seed=0, batch_size=8, restart_every=20)


def test_vq_fit_reduces_error_and_uses_codebook(fitted_vq, toy_images, debug_flavor, tmp_path):
    vq, stats = fitted_vq
    print(f"VQ PSNR {stats.psnr_before:.1f} -> {stats.psnr_after:.1f} dB in {stats.seconds:.1f}s, {stats.extra}")
    # A 70-step fit sits on a plateau before its loss drops, and when it drops depends on float rounding: seeds
    # 0-2 ended at 10.0-11.9 dB with oneDNN's convolutions and 10.5-15.8 dB with torch's own (+3.2 to +8.8 dB
    # over the random VQ's 7 dB). Code initialisation alone gains about 0.6 dB; +2 dB means the fit learned.
    assert stats.psnr_after > stats.psnr_before + 2.0
    assert stats.mse_after < 0.65 * stats.mse_before
    assert stats.extra["codes_used"] >= 16  # dead codes were restarted, not a handful of codes for everything
    # stored codes are unit-norm, so the stock nearest-neighbour encode picks the cosine code we trained with
    norms = vq.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    x = image_tensor(toy_images[:6], debug_flavor.vq.image_size)
    with torch.no_grad():
        ours = vq_reconstruct(vq, x)[2]
        stock = vq.encode(x).image_tokens.view(6, -1)
    assert (ours == stock).float().mean() > 0.99
    vq.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "model.safetensors").is_file()
    again = load_vq(tmp_path / "vq")
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), again.state_dict().values(), strict=True))


def test_build_task_puts_fitted_vq_in_and_keeps_trained_embeddings(fitted_vq, debug_flavor, tmp_path):
    vq, _ = fitted_vq
    vq.save_pretrained(tmp_path / "vq")
    cfg = ModelConfig(flavor="debug", family="janus_pro", vq_path=str(tmp_path / "vq"))
    model = build_model(debug_flavor, "janus_pro")
    assert not holds_vq(model, vq)
    build_task(model, debug_flavor, cfg)
    assert holds_vq(model, vq)
    emb = model.model.generation_embeddings.weight
    assert torch.equal(emb, vq.quantize.embedding.weight)  # warm start from the codebook
    with torch.no_grad():  # "trained" embeddings of a later stage must survive its build_task
        emb.add_(1.0)
    trained = emb.detach().clone()
    build_task(model, debug_flavor, cfg)
    assert torch.equal(model.model.generation_embeddings.weight, trained)


def test_vae_fit_reduces_error_and_sets_scaling(toy_images, debug_flavor, tmp_path):
    vae, stats = fit_vae(debug_flavor, toy_images, steps=40, lr=3e-3, seed=0, batch_size=8)
    print(f"VAE PSNR {stats.psnr_before:.1f} -> {stats.psnr_after:.1f} dB in {stats.seconds:.1f}s, {stats.extra}")
    assert stats.psnr_after > stats.psnr_before + 6.0
    assert vae.config.scaling_factor == pytest.approx(1.0 / stats.extra["latent_std"])
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    again = load_vae(tmp_path / "vae")
    assert again.config.scaling_factor == pytest.approx(vae.config.scaling_factor)


# ---- the held-out checks of fit_tokenizers can fail -------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_x() -> torch.Tensor:
    rng = np.random.default_rng(1)
    return image_tensor(
        [toy_render.encode_image(toy_render.render_shapes(rng, 64, 3)[0], "png") for _ in range(24)], 64
    )


@pytest.fixture(scope="module")
def digits_x() -> torch.Tensor:
    digits = load_digits()
    return image_tensor(
        [toy_render.encode_image(toy_render.render_digit(digits.data[i], 64), "png") for i in range(60)], 64
    )


def _blur(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def test_colour_kept_tells_a_colour_destroying_tokenizer(shapes_x):
    assert colour_kept(shapes_x, shapes_x) == 1.0
    assert colour_kept(shapes_x, _blur(shapes_x)) >= 0.95  # a soft but faithful reconstruction keeps colours
    ink = (shapes_x < 0.5).any(dim=1, keepdim=True)  # anything not near-white
    brown = torch.tensor([140, 90, 40]).view(1, 3, 1, 1) / 127.5 - 1
    browned = torch.where(ink, brown, shapes_x)  # every shape painted one muddy colour
    assert colour_kept(shapes_x, browned) < 0.3


def test_artefact_peak_flags_a_fixed_spot(digits_x):
    faithful = _blur(digits_x)
    assert artefact_peak(digits_x, faithful) < ARTEFACT_MAX
    spotted = faithful.clone()
    spotted[:, :, 56:60, 30:34] = 1.0  # a bright dot at the bottom centre of every digit
    assert artefact_peak(digits_x, spotted) > ARTEFACT_MAX
    metrics = {"vq/shape_colour_kept": 0.5, "vq/artefact_peak/digits": artefact_peak(digits_x, spotted)}
    assert len(warn_if_short("vq", metrics)) == 2
    assert warn_if_short("vq", {"vq/shape_colour_kept": 1.0, "vq/artefact_peak/digits": 0.0}) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "vq",
            marks=pytest.mark.xfail(
                strict=True, reason="#18: the debug VQ keeps ~17.5% (chance) of shape colours and dots digits"
            ),
        ),
        pytest.param(
            "vae",
            marks=pytest.mark.xfail(
                strict=False,
                reason="#18: the debug VAE keeps 97% on the demo world (hue judge), 73% on others (median judge)",
            ),
        ),
    ],
)
def test_shipped_recipe_keeps_held_out_colours(kind, tmp_path):
    """The demo's recipe (configs/data/fit_tokenizers_toy.yaml) on a toy world: about 2-4 min per kind on 2 cores."""
    from common.config import load_config
    from data_prep.toyworld import SplitSizes, ToyWorldConfig, build_toyworld
    from training.tokenizers import FitTokenizersConfig, run_fit_tokenizers

    world = build_toyworld(
        ToyWorldConfig(
            out_dir=str(tmp_path / "tw"), sources=["digits", "shapes"], shapes=SplitSizes(train=600, eval=200)
        ),
        log=lambda _: None,
    )
    other = "vae" if kind == "vq" else "vq"
    overrides = [
        f"toyworld_dir={world}",
        f"out_dir={tmp_path / 'tok'}",
        f"{other}.enabled=false",
        "vision.enabled=false",
        "tracking.backend=none",
    ]
    recipe = Path(__file__).resolve().parents[2] / "configs" / "data" / "fit_tokenizers_toy.yaml"
    cfg = load_config(FitTokenizersConfig, recipe, overrides)
    metrics = run_fit_tokenizers(cfg).metrics
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics[f"{kind}/shape_colour_kept"] >= 0.95
    assert max(metrics[f"{kind}/artefact_peak/{s}"] for s in ("digits", "shapes")) <= ARTEFACT_MAX


def test_fit_device_is_checked_up_front(tmp_path):
    from training.tokenizers import FitTokenizersConfig

    assert FitTokenizersConfig(toyworld_dir=str(tmp_path), device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        FitTokenizersConfig(toyworld_dir=str(tmp_path), device="gpu0")
    with pytest.raises(ValueError, match="fits run on cpu or cuda"):
        FitTokenizersConfig(toyworld_dir=str(tmp_path), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            FitTokenizersConfig(toyworld_dir=str(tmp_path), device="cuda:0")
