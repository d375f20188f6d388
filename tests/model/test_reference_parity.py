"""Numerical parity with the reference JanusFlow generation encoder/decoder, when a checkout is at hand.

Set ``JANUS_REFERENCE_REPO`` to a checkout of github deepseek-ai/Janus (we never vendor its code). Its
``janus/janusflow/models/uvit.py`` is loaded with a stub torchvision (imported there, unused by these
modules); our state dicts must load strictly and give the same outputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from model.flavors import get_flavor
from model.janusflow import build_janusflow

REPO = os.environ.get("JANUS_REFERENCE_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="JANUS_REFERENCE_REPO (a deepseek-ai/Janus checkout) not set")


def _reference_uvit():
    import diffusers.models.embeddings  # noqa: F401  (before the torchvision stub: diffusers probes it)

    stubs = [n for n in ("torchvision", "torchvision.utils") if n not in sys.modules]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    try:
        path = Path(REPO) / "janus" / "janusflow" / "models" / "uvit.py"
        spec = importlib.util.spec_from_file_location("reference_uvit", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:  # the stubs would confuse later availability probes of torchvision
        for name in stubs:
            del sys.modules[name]
    return module


def test_generation_encoder_decoder_match_the_reference():
    ref, flavor = _reference_uvit(), get_flavor("debug")
    f, d = flavor.flow, flavor.llm.hidden_size
    ours = build_janusflow(flavor)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    common = {"block_out_channels": (f.channels,), "layers_in_middle": f.num_blocks, "hidden_size": d}
    enc = ref.ShallowUViTEncoder(
        input_channels=f.latent_channels,
        stride=f.patch_size,
        kernel_size=f.patch_size,
        padding=0,
        norm_eps=f.norm_eps,
        **common,
    )
    dec = ref.ShallowUViTDecoder(
        in_channels=f.channels, out_channels=f.latent_channels, upsamples=1, norm_eps=f.norm_eps, **common
    )
    enc.load_state_dict(ours.vision_gen_enc_model.state_dict(), strict=True)
    dec.load_state_dict(ours.vision_gen_dec_model.state_dict(), strict=True)
    z, t = torch.randn(2, f.latent_channels, f.latent_size, f.latent_size), torch.rand(2)
    x_ref, t_ref, hs = enc(z, t * 1000)
    x, t_emb, skip = ours.vision_gen_enc_model(z, t)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_emb, t_ref)
    h = torch.randn(2, f.channels, f.grid, f.grid)
    torch.testing.assert_close(ours.vision_gen_dec_model(h, skip, t_emb), dec(h, hs, t_ref), rtol=1e-5, atol=1e-5)
