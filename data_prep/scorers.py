"""Model-based scorers (aesthetic, watermark, NSFW, CLIP-like...) that load their weights from a local path.

A scorer maps a list of RGB images to one float each; its values land in ``SampleMeta.scores[name]`` and
the source's ``filters.min_scores`` / ``max_scores`` thresholds apply to them like to metadata scores.
The curation job runs scorers inside a Ray actor pool (``map_batches`` with a callable class) so weights
load once per actor, on CPU or GPU. Models come from the plain-dict registry :data:`SCORER_MODELS`:

- ``torchscript``: any TorchScript module taking float [B, 3, S, S] in [0, 1] and returning [B] scores.
- ``tiny_cnn``: a small conv net read from a state dict; tests use it randomly initialised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DEVICES = ("cpu", "cuda")


@dataclass(kw_only=True)
class ScorerConfig:
    name: str
    """Score name written to SampleMeta.scores and matched by filters.min_scores / max_scores."""
    model: str = "torchscript"
    """Architecture in SCORER_MODELS: torchscript or tiny_cnn."""
    weights: str
    """Local path to the weights (TorchScript file or state dict)."""
    device: str = "cpu"
    """cpu or cuda; cuda reserves num_gpus per actor."""
    input_size: int = 224
    """Images are resized to input_size x input_size before scoring."""
    batch_size: int = 32
    """Images per forward pass."""
    num_gpus: float = 0.0
    """GPUs per scoring actor (set > 0 with device cuda)."""

    def __post_init__(self) -> None:
        if self.model not in SCORER_MODELS:
            raise ValueError(f"scorers.model {self.model!r} is not one of {sorted(SCORER_MODELS)}")
        if self.device not in DEVICES:
            raise ValueError(f"scorers.device {self.device!r} is not one of {DEVICES}")
        if not self.weights:
            raise ValueError(f"scorers[{self.name}].weights is empty: give a local path")
        if self.input_size < 8 or self.batch_size < 1:
            raise ValueError(f"scorers[{self.name}]: input_size >= 8 and batch_size >= 1 required")


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


SCORER_MODELS: dict[str, Callable[[str], Any]] = {"torchscript": _load_torchscript, "tiny_cnn": _load_tiny_cnn}


class ImageScorer:
    """Loads one scorer's weights once (expensive), then scores batches of images."""

    def __init__(self, cfg: ScorerConfig) -> None:
        import torch

        self.cfg = cfg
        self.name = cfg.name
        self.device = torch.device(cfg.device)
        self.model = SCORER_MODELS[cfg.model](cfg.weights).to(self.device).eval()

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


def build_scorers(cfgs: Sequence[ScorerConfig]) -> list[ImageScorer]:
    return [ImageScorer(c) for c in cfgs]
