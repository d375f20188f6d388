"""Loss pieces shared by both families: token cross-entropy with per-task metrics, the text loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.schema import TASKS
from model.prompts import IGNORE


def per_task_means(values: torch.Tensor, tasks: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix/task: mean of values over that task's entries}`` for tasks present (detached floats)."""
    out: dict[str, float] = {}
    values, tasks = values.detach(), tasks.detach()
    for idx in torch.unique(tasks).tolist():
        if idx < 0:
            continue
        out[f"{prefix}/{TASKS[idx]}"] = float(values[tasks == idx].float().mean())
    return out


def text_token_losses(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE of the next-token text targets and the mask of trained positions (over [:, 1:]).

    Only the positions that have a target go through the head (saves the B x T x V logits).
    """
    target = labels[:, 1:]
    mask = target != IGNORE
    logits = lm_head(hidden[:, :-1][mask])
    return F.cross_entropy(logits.float(), target[mask], reduction="none"), mask


REDUCTIONS = ("token", "sample")
"""How token losses become the batch loss: ``token`` = the mean over every trained token (one token, one
vote: a 576-token image outweighs a one-word answer 576 to 1); ``sample`` = each sample's mean over its own
trained tokens, then the mean over samples (every sample weighs the same, whatever its length)."""


def check_reduction(owner: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}.reduction {reduction!r} is not one of {REDUCTIONS}")


def token_sample_ids(segment_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sample (row x segment, unique in the batch) of each target selected by ``mask`` over [:, 1:]."""
    seg = segment_ids[:, 1:]
    rows = torch.arange(seg.shape[0], device=seg.device)[:, None].expand_as(seg)
    return (rows * (int(segment_ids.max()) + 1) + seg)[mask]


def reduce_token_losses(
    parts: list[torch.Tensor],
    like: torch.Tensor,
    sample_ids: list[torch.Tensor] | None = None,
    reduction: str = "token",
) -> torch.Tensor:
    """The batch loss from per-token losses ``parts`` (see REDUCTIONS); ``sample_ids`` (same shapes as the
    parts) name each token's sample and are needed for ``sample``."""
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
    _, ids = torch.unique(ids, return_inverse=True)
    n = int(ids.max()) + 1
    sums = losses.new_zeros(n).index_add(0, ids, losses)
    counts = losses.new_zeros(n).index_add(0, ids, torch.ones_like(losses))
    return (sums / counts).mean()
