"""Loss pieces shared by both families: chunked linear + cross-entropy, reductions, per-task metric sums.

Nothing here waits on the host: positions and targets come as index tensors from the collate function,
sizes from tensor shapes, and metrics stay on the device as ``(sum, count)`` pairs until the training loop
reduces them at a log step (:func:`metric_values` does it at once, for tests and tools).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.schema import TASKS

Metric = tuple[torch.Tensor, torch.Tensor]
"""A metric on the device: (sum of values, number of values), both 0-d float32 tensors."""

CE_CHUNK_ELEMENTS = 2**26
"""Logits materialised at once by :func:`linear_cross_entropy` (x 4 bytes in fp32: 256 MiB)."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row ``cross_entropy(hidden @ weight.T + bias, targets)`` without keeping the [n, V] logits.

    Forward goes chunk by chunk and keeps only each row's log-sum-exp; backward recomputes a chunk's logits,
    turns them into the gradient ``softmax - onehot`` (times the row's incoming gradient) and accumulates the
    weight gradient in fp32. Memory is O(chunk x V) instead of O(n x V) for both passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            losses[rows] = lse[rows] - logits.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = F.linear(hidden[rows], weight, bias).float()
            g = torch.exp(logits - lse[rows, None])
            g.scatter_add_(1, targets[rows, None], g.new_full((g.shape[0], 1), -1.0))
            g = g * grad_losses[rows, None].float()
            if need_b:
                grad_b += g.sum(dim=0)
            g = g.to(weight.dtype)  # the matmuls run in the compute dtype, as autograd's would
            if need_h:
                grad_h[rows] = g @ weight
            if need_w:
                grad_w += g.t() @ hidden[rows]
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE [n] (fp32) of ``head(hidden)`` against ``targets``, in chunks (memory does not grow with
    rows x vocabulary: the 102,400-way text head and the 16,384-way image head)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    chunk = max(1, CE_CHUNK_ELEMENTS // head.weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.to(head.weight.dtype), head.weight, head.bias, targets, chunk)


def rows_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T, D] and flat positions (row * T + column) -> [n, D]."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)


def put_rows(embeds: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``embeds`` [B, T, D] with ``rows`` (any leading shape, last dim D) at the flat ``positions``.

    A new [B, T, D] tensor, not a view of a flat one: a compiled decoder block would guard on the view's
    base and compile the first block apart from the others."""
    t = embeds.shape[1]
    values = rows.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds.index_put((positions // t, positions % t), values)


def text_token_losses(hidden: torch.Tensor, batch: dict, lm_head: nn.Linear) -> torch.Tensor:
    """Per-token CE of the trained text tokens [n_t], in the order of ``batch["text_pos"]``."""
    return linear_cross_entropy(rows_at(hidden, batch["text_pos"]), lm_head, batch["text_targets"])


REDUCTIONS = ("token", "sample")
"""How token losses become the batch loss: ``token`` = the mean over every trained token (one token, one
vote: a 576-token image outweighs a one-word answer 576 to 1); ``sample`` = each sample's mean over its own
trained tokens, then the mean over samples (every sample weighs the same, whatever its length)."""


def check_reduction(owner: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}.reduction {reduction!r} is not one of {REDUCTIONS}")


def reduce_token_losses(
    parts: list[torch.Tensor],
    like: torch.Tensor,
    sample_ids: list[torch.Tensor] | None = None,
    reduction: str = "token",
    num_samples: int = 0,
) -> torch.Tensor:
    """The batch loss from per-token losses ``parts`` (see REDUCTIONS). For ``sample``, ``sample_ids`` (same
    shapes as the parts) name each token's sample in ``range(num_samples)``."""
    check_reduction("reduce_token_losses", reduction)
    keep = [i for i, p in enumerate(parts) if p.numel()]
    if not keep:
        return like.sum() * 0.0  # keeps the graph so backward() works on an all-masked batch
    losses = torch.cat([parts[i] for i in keep])
    if reduction == "token":
        return losses.mean()
    if sample_ids is None:
        raise ValueError("reduce_token_losses: reduction='sample' needs sample_ids")
    ids = torch.cat([sample_ids[i] for i in keep])
    sums = losses.new_zeros(num_samples).index_add(0, ids, losses)
    counts = losses.new_zeros(num_samples).index_add(0, ids, torch.ones_like(losses))
    trained = (counts > 0).to(losses.dtype)  # samples with no trained token take no part
    return (sums / counts.clamp(min=1)).sum() / trained.sum()


def metric(value: torch.Tensor) -> Metric:
    """A single value (e.g. the batch loss) as a metric."""
    value = value.detach().float()
    return value, torch.ones_like(value)


def per_task_sums(values: torch.Tensor, tasks: torch.Tensor, prefix: str) -> dict[str, Metric]:
    """``{prefix/task: (sum, count)}`` for every task in TASKS (count 0 where absent): the same keys on every
    rank and micro-batch, so the loop can reduce them as one tensor."""
    values = values.detach().float()
    sums = values.new_zeros(len(TASKS)).index_add(0, tasks, values)
    counts = values.new_zeros(len(TASKS)).index_add(0, tasks, torch.ones_like(values))
    return {f"{prefix}/{task}": (sums[i], counts[i]) for i, task in enumerate(TASKS)}


def metric_values(metrics: dict[str, Metric]) -> dict[str, float]:
    """Means of the metrics that have values, as floats (one transfer to the host)."""
    if not metrics:
        return {}
    keys = list(metrics)
    stacked = torch.stack([torch.stack([metrics[k][0], metrics[k][1]]) for k in keys]).cpu().tolist()
    return {k: s / c for k, (s, c) in zip(keys, stacked, strict=True) if c > 0}
