"""Toy samples of every task for the model tests (built in code, 64x64 images)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_prep.schema import Sample, SampleMeta, Turn


def png(seed: int, size: int = 64, width: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, width or size, 3), dtype=np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    y, x = rng.integers(8, size - 24, 2)
    arr[y : y + 16, x : x + 16] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_sample(task: str, i: int = 0, vq_tokens: int | None = None) -> Sample:
    key = f"s{task}{i}"
    if task == "caption":
        return Sample(key, SampleMeta("toy", key, task), png(i), "png", text=f"a square number {i}")
    if task in ("chart_doc", "sft"):
        turns = [Turn("user", f"<image>\nWhat is shown {i}?"), Turn("assistant", f"bars {i}")]
        if task == "sft":
            turns = [Turn("system", "You are helpful."), *turns]
        return Sample(key, SampleMeta("toy", key, task, conversation=turns), png(i + 7), "png")
    if task == "text":
        return Sample(key, SampleMeta("toy", key, task), text=f"the quick brown fox {i}")
    meta = SampleMeta("toy", key, task, label=i, class_name=f"digit {i}" if task == "class_label" else None)
    vq = None
    if vq_tokens:
        vq = np.random.default_rng(i).integers(0, 200, vq_tokens).astype(np.int16)
    return Sample(key, meta, png(i + 11), "png", text=f"a red square {i}", vq=vq)


ALL_TASKS = ("caption", "chart_doc", "sft", "text", "t2i", "class_label")
