"""Samples -> a batch of tensors, optionally packed, as a pure function (runs in Ray Data workers).

Batch keys (B rows, T tokens; N_u understanding images, N_g generation images, in sequence order):

- ``input_ids``, ``labels`` (IGNORE where untrained), ``attention_mask`` (1 = a real, attended token),
  ``position_ids`` and ``segment_ids`` [B, T] (segment k >= 1 is the k-th sample of the row, 0 is padding);
- ``kinds`` [B, T]: TEXT, UND_SLOT, GEN_SLOT, UND_BOI, GEN_BOI (model.prompts) and ``token_task`` [B, T]
  (the task index of the token's sample, -1 on padding) for per-task metrics;
- ``und_pixel_values`` [N_u, 3, S, S]: SigLIP input, long side resized, padded with RGB(127,127,127);
- ``gen_pixel_values`` [N_g, 3, G, G] in [-1, 1]: short side resized, centre-cropped (when every generation
  sample has an image); ``gen_ids`` [N_g, n] (when every one has ``vq``); ``gen_latents`` (when every one
  has ``latent``); ``gen_task`` [N_g].

Positions, as flat indices ``row * T + column`` into the [B, T] grid, computed here on the CPU so the step
on the device never waits on the host to learn a size (boolean-mask indexing would):

- ``text_pos`` [n_t]: the position whose hidden state predicts each trained text token (the token before
  it), with ``text_targets``, ``text_task`` and ``text_sample`` (the target's sample) [n_t];
- ``und_slot_pos`` / ``gen_slot_pos`` [N x n] (image slots, in image order), ``und_boi_pos`` /
  ``gen_boi_pos`` [N] (their ``<begin_of_image>``), ``gen_sample`` [N_g] (each generation image's sample);
- ``sample_task`` [n_samples]: the task of each sample (samples are numbered row-major, in row order);
- ``attn_*``: the packed attention layout (model.attention.build_packed_layout).

Packing (``max_len`` with ``pack=True``) concatenates whole samples into rows of at most ``max_len`` tokens
(greedy, in order). Attention stays inside each sample (model.attention: every sample is its own causal
sequence) and ``position_ids`` restart at 0 for every sample.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from data_prep.schema import GENERATION_TASKS, TASKS, Sample
from model.attention import build_packed_layout
from model.prompts import GEN_BOI, GEN_SLOT, IGNORE, TEXT, UND_BOI, UND_SLOT, Example, build_example
from model.tokenizer import SpecialIds

PAD_RGB = (127, 127, 127)


def _open_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1] (also SigLIP's normalisation: mean 0.5, std 0.5)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return arr.permute(2, 0, 1) / 127.5 - 1.0


def preprocess_understanding(data: bytes, size: int) -> torch.Tensor:
    """Long side to ``size``, pad to a square with RGB(127,127,127), normalise to [-1, 1]."""
    img = _open_rgb(data)
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), PAD_RGB)
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return _to_tensor(canvas)


def preprocess_generation(data: bytes, size: int) -> torch.Tensor:
    """Short side to ``size``, centre-crop the long side, normalise to [-1, 1]."""
    img = _open_rgb(data)
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(img.crop((left, top, left + size, top + size)))


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Greedy in-order packing: indices of the examples in each row (each row's total <= max_len)."""
    rows: list[list[int]] = []
    used = max_len + 1
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}")
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def truncate(ex: Example, mask: list[int], max_len: int) -> tuple[Example, list[int]]:
    """Cut a too-long example to ``max_len`` tokens when no image block is cut (long texts, long answers);
    an example whose images do not fit is an error naming its length."""
    if len(ex) <= max_len:
        return ex, mask
    if any(k != TEXT for k in ex.kinds[max_len - 1 :]):
        raise ValueError(f"example of {len(ex)} tokens has image tokens beyond max_len={max_len}")
    cut = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.kinds[:max_len], ex.task)
    cut.num_und_images, cut.has_gen_image = ex.num_und_images, ex.has_gen_image
    return cut, mask[:max_len]


def _image_tensors(samples: Sequence[Sample], und_size: int, gen_size: int) -> dict[str, torch.Tensor]:
    und, gen_pix, gen_ids, gen_lat, gen_task = [], [], [], [], []
    gens = [s for s in samples if s.meta.task in GENERATION_TASKS]
    for s in samples:
        if s.meta.task in GENERATION_TASKS:
            continue
        if s.image is not None:
            und.append(preprocess_understanding(s.image, und_size))
    out = {"und_pixel_values": torch.stack(und) if und else torch.zeros(0, 3, und_size, und_size)}
    for s in gens:
        gen_task.append(TASKS.index(s.meta.task))
        if s.image is not None:
            gen_pix.append(preprocess_generation(s.image, gen_size))
        if s.vq is not None:
            gen_ids.append(torch.from_numpy(s.vq.astype(np.int64).reshape(-1)))
        if s.latent is not None:
            gen_lat.append(torch.from_numpy(s.latent.astype(np.float32)))
    out["gen_task"] = torch.tensor(gen_task, dtype=torch.long)
    if len(gen_pix) == len(gens):
        out["gen_pixel_values"] = torch.stack(gen_pix) if gens else torch.zeros(0, 3, gen_size, gen_size)
    if gens and len(gen_ids) == len(gens):
        out["gen_ids"] = torch.stack(gen_ids)
    if gens and len(gen_lat) == len(gens):
        out["gen_latents"] = torch.stack(gen_lat)
    return out


def _fill_rows(
    examples: list[Example], masks: list[list[int]], rows: list[list[int]], width: int, pad_id: int
) -> dict[str, torch.Tensor]:
    b = len(rows)
    t = {
        "input_ids": torch.full((b, width), pad_id, dtype=torch.long),
        "labels": torch.full((b, width), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros(b, width, dtype=torch.long),
        "position_ids": torch.zeros(b, width, dtype=torch.long),
        "segment_ids": torch.zeros(b, width, dtype=torch.long),
        "kinds": torch.zeros(b, width, dtype=torch.long),
        "token_task": torch.full((b, width), -1, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row, start=1):
            ex, n = examples[i], len(examples[i])
            sl = slice(pos, pos + n)
            t["input_ids"][r, sl] = torch.tensor(ex.input_ids)
            t["labels"][r, sl] = torch.tensor(ex.labels)
            t["attention_mask"][r, sl] = torch.tensor(masks[i])
            t["position_ids"][r, sl] = torch.arange(n)
            t["segment_ids"][r, sl] = seg
            t["kinds"][r, sl] = torch.tensor(ex.kinds)
            t["token_task"][r, sl] = ex.task
            pos += n
    return t


def collate(
    samples: Sequence[Sample],
    *,
    tokenizer,
    special: SpecialIds,
    num_image_tokens: int,
    und_image_size: int,
    gen_image_size: int,
    cfg_drop_prob: float = 0.0,
    rng: random.Random | None = None,
    mask_dropped: bool = False,
    max_len: int | None = None,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """Samples -> batch dict (keys in the module docstring).

    ``cfg_drop_prob`` with ``rng`` drops generation prompts to pad tokens (classifier-free guidance
    training); ``mask_dropped`` also zeroes their attention (JanusFlow). Without ``pack`` there is one
    sample per row, padded to the longest. Samples longer than ``max_len`` are cut (see :func:`truncate`).
    """
    built = [build_example(s, tokenizer, special, num_image_tokens, cfg_drop_prob, rng, mask_dropped) for s in samples]
    if max_len is not None:
        built = [truncate(e, m, max_len) for e, m in built]
    examples, masks = [e for e, _ in built], [m for _, m in built]
    lengths = [len(e) for e in examples]
    if pack:
        if max_len is None:
            raise ValueError("collate: pack=True needs max_len")
        rows = pack_rows(lengths, max_len)
        width = max_len
    else:
        rows = [[i] for i in range(len(examples))]
        width = max(lengths)
    # Image tensors must follow the order of the image slots in the flattened batch: packing keeps the
    # sample order row-major, so the order of samples is also the order of their images.
    order = [i for row in rows for i in row]
    batch = _fill_rows(examples, masks, rows, width, special.pad)
    batch.update(position_tensors(batch))
    batch.update(build_packed_layout(batch["segment_ids"], batch["attention_mask"]))
    batch.update(_image_tensors([samples[i] for i in order], und_image_size, gen_image_size))
    if "gen_ids" in batch and batch["gen_ids"].shape[1] != num_image_tokens:
        raise ValueError(f"collate: vq ids have {batch['gen_ids'].shape[1]} tokens, not {num_image_tokens}")
    assert int((batch["kinds"] == GEN_SLOT).sum()) == num_image_tokens * len(batch["gen_task"])
    return batch


def _flat_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def position_tensors(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flat position indices of a filled batch (keys in the module docstring)."""
    seg, kinds, labels = batch["segment_ids"], batch["kinds"], batch["labels"]
    b, t = seg.shape
    # samples numbered row-major: row r's segment s (>= 1) is sample offset[r] + s - 1
    per_row = seg.max(dim=1).values
    offset = torch.cumsum(per_row, 0) - per_row
    sample = torch.where(seg > 0, offset[:, None] + seg - 1, -1).reshape(-1)
    trained = torch.zeros(b, t, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE
    text_pos = _flat_positions(trained)
    gen_boi = _flat_positions(kinds == GEN_BOI)
    first = _flat_positions((seg > 0) & (batch["position_ids"] == 0))
    return {
        "text_pos": text_pos,
        "text_targets": labels.reshape(-1)[text_pos + 1],
        "text_task": batch["token_task"].reshape(-1)[text_pos],
        "text_sample": sample[text_pos],
        "und_slot_pos": _flat_positions(kinds == UND_SLOT),
        "und_boi_pos": _flat_positions(kinds == UND_BOI),
        "gen_slot_pos": _flat_positions(kinds == GEN_SLOT),
        "gen_boi_pos": gen_boi,
        "gen_sample": sample[gen_boi],
        "sample_task": batch["token_task"].reshape(-1)[first],
    }
