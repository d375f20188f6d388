"""The FLOPs estimate against torch's own count of a debug training step."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.build import ModelConfig, build_collate, build_model, build_task
from model.flavors import get_flavor
from model.flops import _eager_attention, encoder_forward_flops, flops_per_batch, flops_per_sample
from model.freeze import apply_freeze
from tests.model.toy import ALL_TASKS, make_sample


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_estimate_is_close_to_counted_flops_of_a_training_step(family):
    flavor = get_flavor("debug")
    cfg = ModelConfig(flavor="debug", family=family, cfg_drop_prob=0.0)
    collate_fn = build_collate(flavor, cfg)
    model = build_model(flavor, family)
    apply_freeze(model, family, 3)
    _eager_attention(model)  # the FLOP counter does not see CPU SDPA kernels, it does see eager matmuls
    task = build_task(model, flavor, cfg)
    if task.vae is not None:
        task.vae.set_attn_processor(AttnProcessor())
    counted = estimated = 0.0
    for i, t in enumerate(ALL_TASKS):  # one sample per batch: no padding in the counted FLOPs
        batch = collate_fn([make_sample(t, i, vq_tokens=64)])
        counter = FlopCounterMode(display=False)
        # the LLM's packed attention calls SDPA: its math backend is plain matmuls, which the counter sees
        with counter, sdpa_kernel(SDPBackend.MATH):
            loss, _ = task(batch)
            loss.backward()
        counted += counter.get_total_flops()
        estimated += flops_per_batch(flavor, family, batch, stage=3)
    print(f"{family}: counted {counted / 1e9:.2f} GFLOP, estimated {estimated / 1e9:.2f} GFLOP")
    assert 0.95 < estimated / counted < 1.05


def test_real_flavor_estimates():
    pro = get_flavor("janus_pro_1b")
    enc = encoder_forward_flops(pro)
    # SigLIP-L/16 at 384: 2 x 303M params x 576 patches plus attention
    assert 3.5e11 < enc["siglip"] < 4.2e11
    caption = flops_per_sample(pro, seq_len=700, text_targets=100, und_images=1)
    blocks = 6 * 1.234e9 * 700
    assert blocks < caption < 1.25 * blocks
    seven = flops_per_sample(get_flavor("janus_pro_7b"), seq_len=700, text_targets=100, und_images=1)
    assert 4 < seven / caption < 5
    flow = get_flavor("janusflow_1_3b")
    t2i = flops_per_sample(flow, seq_len=600, text_targets=0, gen_images=1, precomputed=False)
    assert t2i > flops_per_sample(flow, seq_len=600, text_targets=0, gen_images=1)
    assert torch.isfinite(torch.tensor(t2i))
