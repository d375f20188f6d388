"""Model-based scorers: what each one is, its config, the job-start checks, and how they group into stages.

A scorer maps a batch of images (and their captions) to one float per image; the value lands in
``SampleMeta.scores[name]`` and each source's ``filters.min_scores`` / ``max_scores`` apply to it like to a
metadata score (rejects are named ``score_<name>_low`` / ``score_<name>_high``). Models, by ``model``:

- ``clip``: image-text cosine similarity of a CLIPModel or SiglipModel in transformers format (a local
  directory with config, safetensors weights and processor files). Its normalised image embeddings are also
  what ``aesthetic`` heads, semantic dedup and the written embeddings use: each image is embedded once.
- ``aesthetic``: the LAION aesthetic predictor layout (the improved MLP 768-1024-128-64-16-1, or the first
  version's single linear layer) on the L2-normalised image embedding of the ``clip`` scorer named in
  ``embedding``, from a local safetensors file. It runs inside that CLIP scorer's actors.
- ``nudenet``: NudeNet's detector (YOLOv8n ONNX, shipped inside the ``nudenet`` wheel; AGPL-3.0, an optional
  extra): the highest confidence of an exposed-body-part detection, 0 when there is none.
- ``image_classifier``: a transformers image classifier (a local directory); the score is the softmax
  probability of the class named ``label`` (e.g. a watermark detector's "watermark").
- ``torchscript``: any TorchScript module taking float [B, 3, S, S] in [0, 1] and returning [B] scores.
- ``tiny_cnn``: a small conv net read from a state dict; tests use it randomly initialised.

Every scorer group is one Ray Data actor-pool stage (data_prep.score_stages): weights load once per actor,
images are scored in batches, on CPU or on a (fractional) GPU. The implementations of the first four are in
data_prep.model_scorers; ``check_scorers`` there runs on the driver at job start, so a missing weights path
or a mismatched architecture fails before any work with a message naming the scorer and the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

DEVICES = ("cpu", "cuda")
MODELS = ("clip", "aesthetic", "nudenet", "image_classifier", "torchscript", "tiny_cnn")
EMBEDDING = "__embedding__"
"""Key of the image embeddings (float32 [n, d], L2-normalised) in a scorer group's output."""


@dataclass(kw_only=True)
class ScorerConfig:
    name: str
    """Score name written to SampleMeta.scores and matched by filters.min_scores / max_scores."""
    model: str = "torchscript"
    """One of clip, aesthetic, nudenet, image_classifier, torchscript, tiny_cnn (see data_prep.scorers)."""
    weights: str = ""
    """Local path: a transformers directory (clip, image_classifier), a safetensors file (aesthetic), a
    TorchScript file or state dict; for nudenet '' means the model inside the nudenet wheel."""
    device: str = "cpu"
    """cpu or cuda (aesthetic heads run on their CLIP scorer's device)."""
    input_size: int = 224
    """torchscript / tiny_cnn: images are resized to input_size x input_size (the others use their own
    preprocessing)."""
    batch_size: int = 32
    """Images per forward pass."""
    num_gpus: float = 0.0
    """GPUs per actor of this scorer's stage; fractions share a GPU between actors (set > 0 with cuda)."""
    num_cpus: float = 1.0
    """CPUs per actor of this scorer's stage."""
    actors: int = 0
    """Actors of this scorer's stage; 0 takes exec.scorer_actors."""
    embedding: str = ""
    """aesthetic: the name of the clip scorer whose image embeddings it reads."""
    label: str = ""
    """image_classifier: the class (an id2label name) whose probability is the score."""
    classes: list[str] = field(default_factory=list)
    """nudenet: detection classes that count; [] takes the exposed-body-part ones (model_scorers)."""

    def __post_init__(self) -> None:
        where = f"scorers[{self.name}]"
        if self.model not in MODELS:
            raise ValueError(f"{where}.model {self.model!r} is not one of {list(MODELS)}")
        if self.device not in DEVICES:
            raise ValueError(f"{where}.device {self.device!r} is not one of {DEVICES}")
        if not self.weights and self.model != "nudenet":
            raise ValueError(f"{where}.weights is empty: give a local path")
        if self.input_size < 8 or self.batch_size < 1:
            raise ValueError(f"{where}: input_size >= 8 and batch_size >= 1 required")
        if self.num_gpus < 0 or self.num_cpus < 0 or self.actors < 0:
            raise ValueError(f"{where}: num_gpus, num_cpus and actors must be >= 0")
        if self.model == "aesthetic" and not self.embedding:
            raise ValueError(f"{where}.embedding is empty: name the clip scorer whose embeddings it reads")
        if self.model == "image_classifier" and not self.label:
            raise ValueError(f"{where}.label is empty: name the class whose probability is the score")


def validate_scorer_set(cfgs: Sequence[ScorerConfig]) -> None:
    """Names unique; every aesthetic head points at a clip scorer of this job."""
    names = [c.name for c in cfgs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"scorers: duplicate names {dupes}")
    clips = {c.name for c in cfgs if c.model == "clip"}
    for c in cfgs:
        if c.model == "aesthetic" and c.embedding not in clips:
            raise ValueError(f"scorers[{c.name}].embedding {c.embedding!r} is not a clip scorer of {sorted(clips)}")


def scorer_groups(cfgs: Sequence[ScorerConfig]) -> list[list[ScorerConfig]]:
    """Scorers that run in one actor: a clip scorer with the aesthetic heads on its embeddings; every other
    scorer alone. In config order of each group's first member."""
    groups: list[list[ScorerConfig]] = []
    for c in cfgs:
        if c.model == "aesthetic":
            continue
        heads = [h for h in cfgs if h.model == "aesthetic" and h.embedding == c.name] if c.model == "clip" else []
        groups.append([c, *heads])
    return groups


def build_tiny_cnn() -> Any:
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(self.features(x).flatten(1))).squeeze(1)

    return TinyCNN()


def _load_tiny_cnn(path: str) -> Any:
    import torch

    model = build_tiny_cnn()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def _load_torchscript(path: str) -> Any:
    import torch

    return torch.jit.load(path, map_location="cpu")


TENSOR_MODELS = {"torchscript": _load_torchscript, "tiny_cnn": _load_tiny_cnn}


class ImageScorer:
    """A torchscript / tiny_cnn scorer: loads its weights once (expensive), then scores batches of images."""

    def __init__(self, cfg: ScorerConfig) -> None:
        import torch

        self.cfg = cfg
        self.name = cfg.name
        self.device = torch.device(cfg.device)
        self.model = TENSOR_MODELS[cfg.model](cfg.weights).to(self.device).eval()

    def _tensor(self, images: Sequence[Image.Image]) -> Any:
        import torch

        size = (self.cfg.input_size, self.cfg.input_size)
        arr = np.stack([np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR)) for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0).to(self.device)

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(images), self.cfg.batch_size):
                batch = self._tensor(images[i : i + self.cfg.batch_size])
                out.extend(float(v) for v in self.model(batch).reshape(-1).cpu())
        return out

    def score_batch(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> dict[str, np.ndarray]:
        return {self.name: np.asarray(self.score(images), dtype=np.float64)}


def build_group(group: Sequence[ScorerConfig], keep_embedding: bool = False) -> Any:
    """The loaded scorer of one group (its weights on its device): ``score_batch(images, texts)`` ->
    {score name: [n] values (NaN: no score for that sample), EMBEDDING: [n, d] when kept}."""
    from data_prep import model_scorers

    head = group[0]
    if head.model in TENSOR_MODELS:
        return ImageScorer(head)
    if head.model == "clip":
        return model_scorers.ClipScorer(head, list(group[1:]), keep_embedding)
    if head.model == "nudenet":
        return model_scorers.NudeNetScorer(head)
    return model_scorers.ClassifierScorer(head)


def build_scorers(cfgs: Sequence[ScorerConfig]) -> list[Any]:
    """Every group's loaded scorer (tests and in-process use; the job runs each group as a stage)."""
    return [build_group(g) for g in scorer_groups(cfgs)]
