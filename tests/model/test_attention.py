"""Packed attention (one causal sequence per sample, no T x T mask) against the dense-mask reference."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from model.attention import PackedLayout, build_packed_layout, layout_from_batch, packed_attention
from model.build import ModelConfig, build_collate, build_model, build_task
from model.family import get_family
from tests.model.dense_reference import build_attention_bias, dense_reference
from tests.model.toy import ALL_TASKS, make_sample


def _packed_batch(family: str, drop: float = 0.5, max_len: int = 300):
    cfg = ModelConfig(flavor="debug", family=family, cfg_drop_prob=drop, max_len=max_len, pack=True)
    from model.flavors import get_flavor

    samples = [make_sample(t, i, vq_tokens=64) for i, t in enumerate(ALL_TASKS * 2)]
    batch = build_collate(get_flavor("debug"), cfg, seed=3)(samples)
    assert int(batch["segment_ids"].max()) >= 3, "rows must hold several samples"
    if get_family(family).masks_dropped_prompts:
        assert (batch["attention_mask"][batch["segment_ids"] > 0] == 0).any(), "a dropped prompt must be masked"
    return cfg, batch


def test_layout_puts_each_sample_in_one_ordered_sequence():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 1, 1, 1]])
    lay = build_packed_layout(seg, attn)
    cu = lay["attn_cu_seqlens"].tolist()
    perm = lay["attn_perm"].tolist()
    sequences = [perm[a:b] for a, b in itertools.pairwise(cu)]
    # row 0: [0,1,2] and [3,4]; row 1: sample 1 keeps its attended tokens 6 and 9, sample 2 is [10, 11]
    assert sequences == [[0, 1, 2], [3, 4], [6, 9], [10, 11]]
    assert sorted(perm[cu[-1] :]) == [5, 7, 8]  # padding and masked tokens: sequences of one
    assert torch.equal(lay["attn_perm"][lay["attn_inv_perm"]], torch.arange(12))
    assert lay["attn_pad_index"].tolist() == [[0, 1, 2], [3, 4, 9], [5, 6, 9], [7, 8, 9]]


def _dense_attention(q, k, v, seg, attn):
    bias = build_attention_bias(seg, attn, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


def test_packed_kernel_equals_dense_mask_where_it_is_read():
    torch.manual_seed(0)
    seg = torch.tensor([[1] * 7 + [2] * 5 + [3] * 3 + [0] * 2, [1] * 10 + [2] * 7])
    attn = torch.ones_like(seg)
    attn[0, -2:] = 0
    attn[1, 1:4] = 0  # a prompt dropped for CFG: masked keys inside a sample
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layout = PackedLayout(*build_packed_layout(seg, attn).values(), kernel="sdpa")
    ours = packed_attention(q, k, v, layout)
    ref = _dense_attention(q, k, v, seg, attn)
    read = ((seg > 0) & (attn > 0))[..., None, None]  # outputs a loss or another query can depend on
    torch.testing.assert_close(ours * read, ref * read, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours) * read
    grads = torch.autograd.grad((ours * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_task_loss_and_gradients_equal_the_dense_reference(family: str):
    from model.flavors import get_flavor

    cfg, batch = _packed_batch(family)
    flavor = get_flavor("debug")
    torch.manual_seed(0)
    model = build_model(flavor, family)
    task = build_task(model, flavor, cfg)
    ref_task = copy.copy(task)  # the same model, config and VAE; only the LLM's attention path differs
    ref_task.__class__ = dense_reference(type(task))
    results = []
    for t in (task, ref_task):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same flow t and noise
        loss, _ = t(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) > 50
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_layout_is_required_and_kernel_names_are_checked():
    _cfg, batch = _packed_batch("janus_pro")
    with pytest.raises(ValueError, match="no attention layout"):
        layout_from_batch({k: v for k, v in batch.items() if k != "attn_perm"})
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(flavor="debug", attention="flex")
    q = torch.zeros(1, 1, 4, 8)
    lay = PackedLayout(*build_packed_layout(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4)).values(), "varlen")
    with pytest.raises(ValueError, match="'varlen' needs CUDA"):
        packed_attention(q, q, q, lay)


@pytest.mark.gpu
def test_varlen_kernel_equals_padded_sdpa_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    seg = torch.tensor([[1] * 300 + [2] * 500 + [3] * 200 + [0] * 24] * 2)
    attn = torch.ones_like(seg)
    attn[1, 5:40] = 0
    q, k, v = (torch.randn(2, 16, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tensors = {k_: t.cuda() for k_, t in build_packed_layout(seg, attn).items()}
    outs = []
    for kernel in ("varlen", "sdpa"):
        out = packed_attention(q, k, v, PackedLayout(*tensors.values(), kernel=kernel))
        outs.append((out, torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-2)
