"""The dense-mask attention path, kept as the reference the packed kernels are checked against (tests only).

Packed rows used to go through an additive [B, 1, T, T] mask: causal, inside each sample, over attended keys
(a query that sees nothing else sees itself, so no softmax row is empty). Every query-key pair of a row is
computed and most are thrown away; model.attention avoids that, and must give the same losses and gradients.
"""

from __future__ import annotations

import torch


def build_attention_bias(segment_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] segments + key mask -> additive [B, 1, T, T] causal mask kept inside each segment."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal & same & attention_mask.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


class DenseReference:
    """Mix in before a task class: its LLM runs transformers' own forward with the dense mask (SDPA)."""

    def run_llm(self, llm, embeds: torch.Tensor, batch: dict, capture: int = 0):
        bias = build_attention_bias(batch["segment_ids"], batch["attention_mask"], embeds.dtype)
        out = llm(
            inputs_embeds=embeds,
            attention_mask=bias,
            position_ids=batch["position_ids"],
            output_hidden_states=bool(capture),
            use_cache=False,
        )
        return out.last_hidden_state, (out.hidden_states[capture] if capture else None)


def dense_reference(task_class: type) -> type:
    """``task_class`` with the dense-mask LLM path."""
    return type(f"Dense{task_class.__name__}", (DenseReference, task_class), {})
