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


def reduce_token_losses(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Mean over every trained token of every part (one token, one vote: no per-task weights)."""
    flat = [p for p in parts if p.numel()]
    if not flat:
        return like.sum() * 0.0  # keeps the graph so backward() works on an all-masked batch
    return torch.cat(flat).mean()
