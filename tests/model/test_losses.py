"""Chunked linear + cross-entropy and the device-side metric sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.losses as losses
from model.losses import linear_cross_entropy, metric, metric_values, per_task_sums, reduce_token_losses


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CE_CHUNK_ELEMENTS", 3 * 11)  # 3 rows of an 11-way head per chunk


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_ce_equals_full_logits(small_chunks, bias: bool):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=bias).double()
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    weights = torch.rand(10, dtype=torch.float64)  # any downstream use of the per-row losses
    ours = linear_cross_entropy(hidden, head, targets)
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    torch.testing.assert_close(ours, ref)
    params = [hidden, *head.parameters()]
    g_ours = torch.autograd.grad((ours.double() * weights).sum(), params)
    g_ref = torch.autograd.grad((F.cross_entropy(head(hidden), targets, reduction="none") * weights).sum(), params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_chunked_ce_gradcheck(small_chunks):
    torch.manual_seed(1)
    hidden = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))

    def fn(h, w, b):
        return losses._LinearCrossEntropy.apply(h, w, b, targets, 3).double()

    # the forward keeps fp32 losses, so check against the fp32 precision of the recomputed softmax
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_chunked_ce_in_bf16_matches_autograd_of_the_full_logits(small_chunks):
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 11, bias=False).to(torch.bfloat16)
    hidden = torch.randn(12, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 11, (12,))
    ours = linear_cross_entropy(hidden, head, targets)
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    g = torch.autograd.grad(ours.mean(), (hidden, head.weight))
    r = torch.autograd.grad(ref.mean(), (hidden, head.weight))
    assert g[1].dtype == torch.bfloat16
    for a, b in zip(g, r, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_frozen_head_gets_no_gradient(small_chunks):
    head = torch.nn.Linear(4, 11).requires_grad_(False)
    hidden = torch.randn(5, 4, requires_grad=True)
    linear_cross_entropy(hidden, head, torch.zeros(5, dtype=torch.long)).sum().backward()
    assert hidden.grad is not None and head.weight.grad is None


def test_sample_reduction_and_metric_sums():
    text = torch.tensor([1.0, 3.0, 5.0])
    image = torch.tensor([2.0, 2.0])
    ids = [torch.tensor([0, 0, 2]), torch.tensor([1, 1])]
    # sample 0: mean 2, sample 1: mean 2, sample 2: 5; sample 3 has no target and takes no part
    loss = reduce_token_losses([text, image], text, ids, "sample", num_samples=4)
    torch.testing.assert_close(loss, torch.tensor(3.0))
    torch.testing.assert_close(reduce_token_losses([text, image], text, ids, "token"), torch.tensor(13.0 / 5))
    sums = per_task_sums(torch.cat([text, image]), torch.tensor([1, 1, 4, 0, 0]), "loss")
    sums["loss"] = metric(loss)
    values = metric_values(sums)
    assert values == {"loss": 3.0, "loss/t2i": 2.0, "loss/caption": 2.0, "loss/text": 5.0}
