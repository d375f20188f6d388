"""Independent judges of generated images and the held-out toy questions they are compared with.

- :class:`DigitJudge`: logistic regression on 8x8 box-downscaled greyscale pixels (the resolution of the
  sklearn digits), trained on the real digits of the toy world's ``digits/eval`` split (the sklearn digits not
  in the toy training split), never on generated images. Its own accuracy is measured on the real digits of
  ``digits/train``, which it never saw (the generator trained on them, the judge did not).
- :func:`judge_colour`: the dominant colour of an image's ink, named by the nearest hue of
  ``toy_render.COLORS`` ("none" when the image is all background or grey).
- :func:`artefact_peak`: how far images stand apart from reference images at one fixed position (a spot every
  generated or reconstructed image carries, which the real ones do not).
- :func:`load_questions`: the understanding questions of the eval splits only, with their chance level.
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep.toy_render import CHART_TITLES, COLORS, DOC_AMOUNTS, DOC_ITEMS, DOC_TITLES, SHAPES
from data_prep.toyworld import COLOUR_QUESTION, COUNT_QUESTION, DIGIT_QUESTION, SHAPE_QUESTION

WHITE_MARGIN = 60
"""A pixel is background when each channel is within this of 255."""
ARTEFACT_MAX = 0.07
"""Largest acceptable :func:`artefact_peak` (intensity in [0, 1]). The debug VQ's bright dot at the bottom centre
of every digit measured 0.09 on its reconstructions of 200 held-out digits, a VAE without one 0.05."""
ARTEFACT_Z = 5.0
"""For unpaired images (generated against real): a position counts only where its mean difference is this many
standard errors from the typical one, so that a few dozen samples' noise is not read as an artefact."""
ARTEFACT_LOCAL = 9
"""For generated images: cells (of 2x2 pixels) on a side of the neighbourhood a spot is measured against."""


def _grey8(img: Image.Image) -> np.ndarray:
    """Box-downscale to 8x8 greyscale in [0, 1] (the inverse of the toy world's 8x8 -> 64x64 upscale)."""
    return np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel() / 255.0


def _open(data: bytes | Image.Image) -> Image.Image:
    return data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data)).convert("RGB")


def artefact_peak(reference: torch.Tensor, images: torch.Tensor, z_min: float = 0.0, local: int = 0) -> float:
    """How far the strongest fixed-position difference of ``images`` from ``reference`` stands above the typical
    one, in intensity in [0, 1] (both ``[N, 3, H, W]`` tensors in [-1, 1]; the counts may differ).

    Per 2x2 cell (the outermost ring of pixels left out: a conv autoencoder's corner pixels are off in every
    image, one pixel each, invisible), the mean of ``images`` minus the mean of ``reference``; the peak of its
    magnitude (largest channel) minus the median. Differences that follow the content average out over many
    images; a decoder that paints the same spot at the same place in every image does not. With ``z_min`` a
    cell counts only where its difference from the median is at least ``z_min`` standard errors (from the two
    sets' spread there): generated images are not paired with real ones, and their mean is noisy where strokes
    vary; a spot painted on every image is consistent and passes. With ``local`` (an odd number of cells) the
    difference is taken against the median difference of the ``local`` x ``local`` cells around it instead of
    the whole image's: a generator whose digits differ from the real ones all over (thicker, fewer shapes per
    class) differs smoothly, a spot differs from its surroundings.
    """
    if local and (local < 3 or local % 2 == 0):
        raise ValueError(f"artefact_peak: local must be 0 or an odd number >= 3 of cells, got {local}")
    if images.shape[1:] != reference.shape[1:]:
        raise ValueError(f"artefact_peak: images {tuple(images.shape[1:])} and reference "
                         f"{tuple(reference.shape[1:])} differ in size")  # fmt: skip

    def cells(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x[:, :, 1:-1, 1:-1].float() / 2, 2, stride=1)

    a, b = cells(images), cells(reference)
    diff = a.mean(0) - b.mean(0)  # [3, h, w]
    if local:
        pad = local // 2
        around = F.unfold(F.pad(diff[None], (pad,) * 4, mode="replicate"), local)
        diff = diff - around.view(diff.shape[0], local * local, -1).median(1).values.view_as(diff)
    bias = diff.abs().amax(0)
    excess = bias - bias.median()
    if z_min > 0:
        centred = diff - diff.flatten(1).median(1).values[:, None, None]
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt().clamp_min(1e-4)
        consistent = ((centred.abs() / se) >= z_min).any(0)
        excess = torch.where(consistent, excess, torch.zeros_like(excess))
    return float(excess.max().clamp_min(0))


def read_digits(toyworld: Path, split: str) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of the toy world's real digits in ``split``."""
    folder = Path(toyworld) / "digits" / split
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [((folder / r["image"]).read_bytes(), int(r["label"])) for r in rows]


class DigitJudge:
    """Names the digit in an image; trained on real held-out digits only."""

    def __init__(self, images: Sequence[bytes | Image.Image], labels: Sequence[int], seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = np.stack([_grey8(_open(i)) for i in images])
        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, random_state=seed))
        self.classifier.fit(x, np.asarray(labels))

    def predict(self, images: Sequence[bytes | Image.Image]) -> list[int]:
        x = np.stack([_grey8(_open(i)) for i in images])
        return [int(v) for v in self.classifier.predict(x)]

    def accuracy(self, images: Sequence[bytes | Image.Image], labels: Sequence[int]) -> float:
        pred = self.predict(images)
        return float(np.mean([p == t for p, t in zip(pred, labels, strict=True)]))


def build_digit_judge(toyworld: Path, seed: int = 0) -> tuple[DigitJudge, float, int]:
    """-> judge trained on ``digits/eval``, its accuracy on the unseen real ``digits/train``, train size."""
    train = read_digits(toyworld, "eval")
    judge = DigitJudge([b for b, _ in train], [y for _, y in train], seed)
    held = read_digits(toyworld, "train")
    return judge, judge.accuracy([b for b, _ in held], [y for _, y in held]), len(train)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """RGB minus its grey level: the part of a colour that mixing it with white, grey or black only scales."""
    return rgb - rgb.mean(axis=-1, keepdims=True)


def judge_colour(image: bytes | Image.Image) -> str:
    """The named colour (``toy_render.COLORS``) most of the image's ink is: "none" for a blank or grey image.

    Each non-background pixel votes for the named colour nearest in hue (the direction of its chroma), weighted
    by its chroma. Anti-aliased, blurred or faded pixels are the colour mixed with the white background, which
    scales the chroma but keeps its direction, so they vote as the solid colour does; a judge of the pixels'
    median or mean colour reads a blurred orange square as a paler, different colour (an 8x8 box-blur of the
    held-out toy shapes kept 39% of their colours under the median judge, 100% under this one). Grey or black
    pixels have no chroma and no vote.
    """
    arr = np.asarray(_open(image).convert("RGB"), dtype=np.float64).reshape(-1, 3)
    ink = arr[(arr < 255 - WHITE_MARGIN).any(axis=1)]
    if len(ink) < max(4, arr.shape[0] // 200):
        return "none"
    chroma = _chroma(ink)
    weight = np.linalg.norm(chroma, axis=1)
    if (weight > 8.0).sum() < 4:  # grey ink only (a chroma of 8 in 255: JPEG-level noise)
        return "none"
    names = list(COLORS)
    hues = _chroma(np.asarray([COLORS[n] for n in names], dtype=np.float64))
    hues /= np.linalg.norm(hues, axis=1, keepdims=True)
    votes = np.bincount((chroma @ hues.T).argmax(axis=1), weights=weight, minlength=len(names))
    return names[int(votes.argmax())]


def normalise_answer(text: str) -> str:
    """Lower case, inner whitespace collapsed, surrounding space and final punctuation dropped."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?").strip()


@dataclass(frozen=True)
class Question:
    """One held-out understanding question."""

    kind: str
    """Question type (report key): digit, shape_colour, chart_doc/<question slug>."""
    image: bytes
    question: str
    answer: str
    chance: float | None
    """Probability that the best guess made without the image is right: 1/k for k equally likely answers, the
    most likely answer's probability otherwise (a document's total); None where undefined."""


@functools.cache
def total_chance() -> float:
    """The probability of the most likely document total (the renderer's item count and amounts, uniform):
    what always answering that one number scores, about 0.039, not one over the ~55 possible totals."""
    lo, hi = DOC_AMOUNTS
    one = np.zeros(hi + 1)
    one[lo:] = 1 / (hi - lo + 1)
    items = range(DOC_ITEMS[0], DOC_ITEMS[1] + 1)
    mix = np.zeros(hi * DOC_ITEMS[1] + 1)
    for n in items:
        dist = np.array([1.0])
        for _ in range(n):
            dist = np.convolve(dist, one)
        mix[: len(dist)] += dist / len(items)
    return float(mix.max())


def _chart_chance(question: str, meta: dict) -> float | None:
    labels = meta.get("data", {}).get("labels")
    fixed = {
        "What is the title of the chart?": 1 / len(CHART_TITLES),
        "What is the title of the document?": 1 / len(DOC_TITLES),
        "Is the line going up or down?": 1 / 2,
        "How many bars are there?": 1 / 3,  # 3..5
        "How many slices are there?": 1 / 3,  # 2..4
        "How many items are listed?": 1 / (DOC_ITEMS[1] - DOC_ITEMS[0] + 1),
    }
    if question in fixed:
        return fixed[question]
    if question.startswith(("Which bar", "Which slice")) and labels:
        return 1 / len(labels)
    if question == "What is the total?":
        return total_chance()
    return None  # a question this table does not know


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _chart_questions(toyworld: Path) -> list[Question]:
    import webdataset as wds

    out = []
    for tar in sorted((toyworld / "charts_docs" / "eval").glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            turns = meta["conversation"]
            for user, bot in zip(turns[0::2], turns[1::2], strict=True):
                q = user["content"].split("\n")[-1]
                kind = f"chart_doc/{_slug(q)}"
                out.append(Question(kind, sample["png"], q, bot["content"], _chart_chance(q, meta)))
    return out


def _shape_questions(folder: Path) -> list[Question]:
    """Colour, kind and count of the drawn shapes (the questions the toy world's shapes_qa trains on)."""
    if not folder.is_dir():
        return []
    items = [(json.loads(p.read_text()), p.with_suffix(".png").read_bytes()) for p in sorted(folder.glob("*.json"))]
    max_count = max((f["count"] for f, _ in items), default=1)  # counts are uniform on 1..max_count
    out = []
    for facts, image in items:
        out += [
            Question("shape_colour", image, COLOUR_QUESTION, facts["color"], 1 / len(COLORS)),
            Question("shape_kind", image, SHAPE_QUESTION, facts["shape"], 1 / len(SHAPES)),
            Question("shape_count", image, COUNT_QUESTION, str(facts["count"]), 1 / max_count),
        ]
    return out


def load_questions(toyworld: str | Path, max_per_kind: int) -> list[Question]:
    """Held-out questions (eval splits only), at most ``max_per_kind`` of each type, in file order."""
    root = Path(toyworld)
    qs: list[Question] = []
    if (root / "digits" / "eval").is_dir():
        qs += [Question("digit", b, DIGIT_QUESTION, str(y), 0.1) for b, y in read_digits(root, "eval")]
    qs += _shape_questions(root / "shapes" / "eval")
    if (root / "charts_docs" / "eval").is_dir():
        qs += _chart_questions(root)
    kept: list[Question] = []
    counts: dict[str, int] = {}
    for q in qs:
        if counts.get(q.kind, 0) < max_per_kind:
            counts[q.kind] = counts.get(q.kind, 0) + 1
            kept.append(q)
    return kept
