"""Attention over packed rows without a dense T x T mask: each sample attends causally to itself only.

A packed row holds several samples; the dense alternative (an additive [B, 1, T, T] mask) makes the kernel
compute every query-key pair of the row and throw most away. Here the collate function (on the CPU, before
the batch reaches the device) lays the batch's tokens out as variable-length sequences, one per sample:

- the attended tokens of each sample (``attention_mask`` 1), in order, form one causal sequence;
- every other token (padding, a prompt dropped for classifier-free guidance) is a sequence of one: it
  attends to itself. No loss reads these positions and no other query attends to them, so the losses and
  gradients are those of the dense mask (the reference in the tests), which lets a padding query see itself
  and a dropped prompt token see the sample's BOS.

Kernels (``ModelConfig.attention``):

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's variable-length kernel) on the
  sequences laid end to end: the exact per-sample causal triangles, nothing else, no compile needed. CUDA
  with bf16/fp16 only.
- ``sdpa``: the sequences padded to the longest one, ``[S, H, L, d]``, through
  ``scaled_dot_product_attention(is_causal=True)``: the padding sits after each sequence, so causality
  alone keeps it out. Any device and dtype, with autograd (the CPU path and the GPU fallback).
- ``auto``: ``varlen`` where it runs, else ``sdpa``.

FlexAttention with a document block mask was the other candidate; it has no backward on the CPU (so the
suite could not check it against the reference), needs ``torch.compile`` to be fast, and works in 128-token
blocks, so a sample's last partial block is computed in full.

The layout travels as batch tensors (``attn_*``); the decoder layers get it as the ``janus_layout`` keyword,
which transformers passes through to the attention function registered here as ``janus_packed``. Without it
the function is transformers' SDPA attention, so the same model still samples with a KV cache.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "janus_packed"
"""The name of our attention function in transformers' AttentionInterface."""
KERNELS = ("auto", "varlen", "sdpa")
LAYOUT_KEYS = ("attn_perm", "attn_inv_perm", "attn_cu_seqlens", "attn_pad_index", "attn_unpad_index")
"""Batch keys of the layout (all long/int32 tensors; their shapes carry the sequence count and length)."""


class PackedLayout(NamedTuple):
    """Where each token goes (see the module docstring); built by :func:`build_packed_layout`."""

    perm: torch.Tensor
    """[N] flat token index (row * T + column) in sequence order: multi-token sequences first, then singles."""
    inv_perm: torch.Tensor
    """[N] the inverse permutation."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32 offsets of the S multi-token sequences in ``perm``."""
    pad_index: torch.Tensor
    """[S, L] position in ``perm`` of each sequence's tokens, padded with M (the number of multi tokens)."""
    unpad_index: torch.Tensor
    """[M] position in the flattened [S * L] padded layout of each multi token."""
    kernel: str = "auto"
    """One of KERNELS."""

    @property
    def max_seqlen(self) -> int:
        return self.pad_index.shape[1]

    @property
    def multi_tokens(self) -> int:
        return self.unpad_index.shape[0]


def build_packed_layout(segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layout of a [B, T] batch as batch tensors (CPU, in the collate function; LAYOUT_KEYS)."""
    b, t = segment_ids.shape
    flat_seg = segment_ids.reshape(-1)
    attended = (attention_mask.reshape(-1) > 0) & (flat_seg > 0)
    row = torch.arange(b * t) // t
    group = torch.where(attended, row * (int(flat_seg.max()) + 1) + flat_seg, -1)
    ids, counts = torch.unique(group[attended], return_counts=True)
    multi_ids = ids[counts > 1]
    in_multi = attended & torch.isin(group, multi_ids)
    # a stable sort by sequence id keeps the tokens of a sequence in order; singles go last
    key = torch.where(in_multi, group, torch.iinfo(torch.long).max)
    perm = torch.sort(key, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    lengths = counts[counts > 1]
    m, s = int(lengths.sum()), int(lengths.numel())
    longest = int(lengths.max()) if s else 1
    cu = torch.zeros(s + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    seq = torch.repeat_interleave(torch.arange(s), lengths)
    offset = torch.arange(m) - cu[:-1].long().repeat_interleave(lengths)
    pad_index = torch.full((s, longest), m, dtype=torch.long)
    pad_index[seq, offset] = torch.arange(m)
    return {
        "attn_perm": perm,
        "attn_inv_perm": inv_perm,
        "attn_cu_seqlens": cu,
        "attn_pad_index": pad_index,
        "attn_unpad_index": seq * longest + offset,
    }


def layout_from_batch(batch: dict, kernel: str = "auto") -> PackedLayout:
    missing = [k for k in LAYOUT_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch has no attention layout ({missing}); build it with model.collate.collate")
    return PackedLayout(*(batch[k] for k in LAYOUT_KEYS), kernel=kernel)


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def varlen_available(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _varlen_fn() is not None


def _causal_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float | None):
    fn = _varlen_fn()
    cu, n = layout.cu_seqlens, layout.max_seqlen
    # torch 2.9-2.10 took is_causal; later releases express causality as window_size=(-1, 0)
    causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(fn).parameters else {"is_causal": True}
    return fn(q, k, v, cu, cu, n, n, scale=scale, **causal)


def _causal_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float | None):
    """[M, H, d] sequence tokens -> padded [S, H, L, d] -> causal SDPA -> back to [M, H, d]."""
    h, d = q.shape[1:]

    def padded(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x.new_zeros(1, h, d)])  # row M: the padding
        return x[layout.pad_index].transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(-1, h, d)[layout.unpad_index]


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float | None = None
) -> torch.Tensor:
    """q, k, v [B, H, T, d] (RoPE applied) -> attention output [B, T, H, d], each sample on its own."""
    b, h, t, d = q.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(b * t, h, d)[layout.perm]

    q, k, v = tokens(q), tokens(k), tokens(v)
    m = layout.multi_tokens
    kernel = layout.kernel
    if kernel == "auto":
        kernel = "varlen" if varlen_available(q) else "sdpa"
    if kernel == "varlen" and not varlen_available(q):
        raise ValueError(f"attention kernel 'varlen' needs CUDA, bf16/fp16 and torch >= 2.9; got {q.device} {q.dtype}")
    attend = _causal_varlen if kernel == "varlen" else _causal_padded
    out = attend(q[:m], k[:m], v[:m], layout, scale) if m else q[:0]
    out = torch.cat([out, v[m:]])  # a sequence of one token attends to itself: its value
    return out[layout.inv_perm].reshape(b, t, h, d)


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    janus_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; with ``janus_layout`` the packed kernels, else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if janus_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout:
        raise ValueError("packed attention has no dropout (the Janus LLMs train without it)")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: DeepSeek-LLM has none, but be exact
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    return packed_attention(query, key, value, janus_layout, scaling), None


def apply_packed_attention(llm: nn.Module) -> None:
    """Route a transformers LLM's attention through :func:`packed_attention_forward` (in place).

    Registered under PACKED_ATTENTION in transformers' attention and mask interfaces (the mask is SDPA's, for
    the calls that pass no layout, such as sampling with a KV cache)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    llm.config._attn_implementation = PACKED_ATTENTION


def packed_decoder_forward(
    llm: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, layout: PackedLayout, capture: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A transformers Llama decoder (``LlamaModel``) over ``embeds`` with the packed layout, for training.

    What ``LlamaModel.forward`` does minus what training must not pay for: no KV cache (a cache in a
    training forward also makes ``torch.compile`` recompile per layer), no T x T mask, no output hooks.
    Returns the normed last hidden state and, with ``capture=k``, the hidden state after block k (REPA).
    """
    rope = llm.rotary_emb(embeds, position_ids=position_ids)
    hidden, captured = embeds, None
    for i, layer in enumerate(llm.layers[: llm.config.num_hidden_layers], start=1):
        hidden = layer(hidden, position_embeddings=rope, position_ids=position_ids, janus_layout=layout)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if i == capture:
            captured = hidden
    return llm.norm(hidden), captured


class PackedTask(nn.Module):
    """Base of the training tasks: their LLM attends through the packed layout with kernel ``attention``."""

    def __init__(self, llm: nn.Module, attention: str = "auto"):
        super().__init__()
        if attention not in KERNELS:
            raise ValueError(f"attention kernel {attention!r} is not one of {KERNELS}")
        self.attention = attention
        apply_packed_attention(llm)

    @property
    def vae(self) -> nn.Module | None:
        """The frozen decoder the family's sampler needs beside the weights (JanusFlow's VAE), or None."""
        return None

    def run_llm(
        self, llm: nn.Module, embeds: torch.Tensor, batch: dict, capture: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last hidden state, hidden state after block ``capture``) of the batch (the tests' dense-mask
        reference overrides this)."""
        layout = layout_from_batch(batch, self.attention)
        return packed_decoder_forward(llm, embeds, batch["position_ids"], layout, capture)
