"""Pre-fitting the debug flavor's understanding encoder (SigLIP) on image-text pairs, before training.

The papers start from a pretrained SigLIP (SigLIP-Large, frozen until stage III); the debug flavor's is random,
and a random 2-layer tower trained only through the LLM's answers learns colour (a per-patch mean) but hardly
shape, count or chart layout in the demo's budget. This is the debug analogue of SigLIP's pretraining: the
flavor's tower (transformers ``SiglipVisionModel`` with its attention-pooling head, JanusFlow's class) is fitted
with SigLIP's pairwise sigmoid loss against a bag-of-words text tower, on the toy world's training images and
their texts (captions, class prompts, the question/answer pairs of charts and documents). Only the vision tower
is kept; ``apply_vision`` puts it into either family (each family's spec maps the names: Janus-Pro's
``JanusVisionModel`` is the same network with another name for the attention output projection and no pooling
head).

Texts are bags of tokens: the words of a caption (``words``), or one ``question=answer`` token per
question/answer pair, so "which bar is highest: A" and "which bar is lowest: A" stay apart. Pairs whose texts
have the same bag are positives of each other (ten images of the digit 7 share one prompt).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SiglipVisionModel

from model.collate import preprocess_understanding
from model.family import family_of
from model.flavors import FlavorConfig
from model.janusflow import build_siglip_config

Log = Callable[[int, dict[str, float]], None]
UNK = "<unk>"


@dataclass(frozen=True)
class Pair:
    """One training or evaluation pair: encoded image bytes, its text tokens and the source it came from."""

    image: bytes
    tokens: tuple[str, ...]
    source: str

    @property
    def text_key(self) -> str:
        """Pairs with the same key are positives of each other."""
        return " ".join(sorted(self.tokens))


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of a caption."""
    return re.findall(r"[a-z0-9]+", text.lower())


def slug(question: str) -> str:
    return "_".join(words(question))


def qa_tokens(conversation: Sequence[dict[str, str]]) -> list[str]:
    """One ``question=answer`` token per user/assistant turn pair (the image tag dropped)."""
    tokens, question = [], None
    for turn in conversation:
        if turn.get("role") == "user":
            question = slug(turn.get("content", "").replace("<image>", " "))
        elif turn.get("role") == "assistant" and question:
            tokens.append(f"{question}={'_'.join(words(turn.get('content', '')))}")
            question = None
    return tokens


class TextTower(nn.Module):
    """Bag of tokens -> unit vector: mean of token embeddings, LayerNorm, linear."""

    def __init__(self, vocab: Sequence[str], dim: int, out_dim: int):
        super().__init__()
        self.index = {w: i for i, w in enumerate([UNK, *vocab])}
        self.embed = nn.EmbeddingBag(len(self.index), dim, mode="mean")
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def ids(self, bags: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        flat, offsets = [], []
        for bag in bags:
            offsets.append(len(flat))
            flat.extend(self.index.get(t, 0) for t in (bag or [UNK]))
        return torch.tensor(flat), torch.tensor(offsets)

    def forward(self, bags: Sequence[Sequence[str]]) -> torch.Tensor:
        ids, offsets = self.ids(bags)
        return F.normalize(self.proj(self.norm(self.embed(ids, offsets))), dim=-1)


def build_vision(flavor: FlavorConfig) -> SiglipVisionModel:
    """The flavor's random SigLIP tower (with its pooling head)."""
    return SiglipVisionModel(build_siglip_config(flavor))


def image_embeddings(vision: SiglipVisionModel, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(vision(pixel_values=x).pooler_output, dim=-1)


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor, scale, bias) -> torch.Tensor:
    """SigLIP's loss: every image-text pair of the batch is a binary match / no-match decision."""
    logits = img @ txt.T * scale.exp() + bias
    labels = same.float() * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


@torch.no_grad()
def retrieval_top1(vision: SiglipVisionModel, text: TextTower, pairs: Sequence[Pair], size: int) -> tuple[float, float]:
    """(accuracy, chance) of picking each image's own text among the distinct texts of ``pairs``."""
    keys = sorted({p.text_key for p in pairs})
    bags = [next(p.tokens for p in pairs if p.text_key == k) for k in keys]
    vision.eval()
    text.eval()
    txt = text(bags)
    right = 0
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        x = torch.stack([preprocess_understanding(p.image, size) for p in chunk])
        best = (image_embeddings(vision, x) @ txt.T).argmax(-1)
        right += sum(keys[int(b)] == p.text_key for b, p in zip(best, chunk, strict=True))
    return right / len(pairs), 1.0 / len(keys)


def _balanced_batches(pairs: Sequence[Pair], batch: int, steps: int, seed: int):
    """Each batch draws about equally from every source (the small sources are not drowned out)."""
    rng = random.Random(seed)
    by_source: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_source.setdefault(p.source, []).append(i)
    sources = sorted(by_source)
    queues: dict[str, list[int]] = {s: [] for s in sources}
    for _ in range(steps):
        picked = []
        for j in range(batch):
            s = sources[j % len(sources)]
            if not queues[s]:
                queues[s] = rng.sample(by_source[s], len(by_source[s]))
            picked.append(queues[s].pop())
        yield picked


def fit_vision(
    flavor: FlavorConfig,
    pairs: Sequence[Pair],
    steps: int = 800,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    batch_size: int = 64,
    text_dim: int = 128,
    log: Log | None = None,
) -> tuple[SiglipVisionModel, TextTower, dict[str, float]]:
    """The flavor's SigLIP fitted contrastively on ``pairs``; returns it (eval mode, frozen), the text tower
    and the fit's figures (first and last loss, seconds)."""
    if not pairs:
        raise ValueError("fit_vision: no image-text pairs to fit on")
    torch.manual_seed(seed)
    size = flavor.vision.image_size
    vision = build_vision(flavor)
    vocab = sorted({t for p in pairs for t in p.tokens})
    text = TextTower(vocab, text_dim, vision.config.hidden_size)
    scale = nn.Parameter(torch.tensor(math.log(10.0)))
    bias = nn.Parameter(torch.tensor(-10.0))
    x_all = torch.stack([preprocess_understanding(p.image, size) for p in pairs])
    keys = [p.text_key for p in pairs]
    params = [*vision.parameters(), *text.parameters(), scale, bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    vision.train()
    text.train()
    first = last = float("nan")
    start = time.perf_counter()
    for step, idx in enumerate(_balanced_batches(pairs, batch_size, steps, seed), start=1):
        batch_keys = [keys[i] for i in idx]
        same = torch.tensor([[a == b for b in batch_keys] for a in batch_keys])
        loss = sigmoid_loss(
            image_embeddings(vision, x_all[idx]), text([pairs[i].tokens for i in idx]), same, scale, bias
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        first = last if step == 1 else first
        if log:
            log(step, {"vision/loss": last, "vision/scale": scale.exp().item()})
    vision.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    stats = {"loss_first": first, "loss_last": last, "seconds": time.perf_counter() - start, "steps": float(steps)}
    return vision, text, stats


def load_vision(path: str | Path) -> SiglipVisionModel:
    """A fitted tower saved with ``save_pretrained`` (safetensors)."""
    return SiglipVisionModel.from_pretrained(str(path), local_files_only=True).eval()


def vision_module(model: nn.Module) -> nn.Module:
    """The understanding encoder of a Janus-Pro or JanusFlow model."""
    return family_of(model).vision(model)


def apply_vision(model: nn.Module, vision: SiglipVisionModel) -> None:
    """Load a fitted tower into the model's understanding encoder (every weight, strictly; the family maps the
    names: transformers' ``JanusVisionModel`` is the same network under other names, without the pooling head)."""
    spec = family_of(model)
    spec.vision(model).load_state_dict(spec.siglip_state(vision.state_dict()), strict=True)
