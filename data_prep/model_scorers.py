"""The standard scorers (CLIP similarity, LAION aesthetic heads, NudeNet, an image classifier) and the
job-start checks of every scorer's weights. data_prep.scorers says what each one computes.

Weights only ever come from local paths or from inside an installed wheel: transformers directories load
with ``local_files_only=True`` (safetensors), aesthetic heads with ``safetensors.torch.load_file``; nothing
is unpickled or downloaded.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.scorers import EMBEDDING, TENSOR_MODELS, ScorerConfig, validate_scorer_set

CLIP_TYPES = ("clip", "siglip")
AESTHETIC_MLP = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
"""Linear layers of the improved LAION aesthetic predictor (dropouts between them hold no weights)."""
NUDENET_EXPOSED = (
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_EXPOSED",
)
"""NudeNet classes that count as unsafe (faces, feet, covered parts and the male chest do not)."""


class ScorerWeightsError(ValueError):
    """A scorer whose weights are missing, unreadable or of another architecture."""


def _fail(cfg: ScorerConfig, path: str, what: str) -> ScorerWeightsError:
    return ScorerWeightsError(f"scorers[{cfg.name}] ({cfg.model}): {path}: {what}")


def _read_config(cfg: ScorerConfig) -> dict[str, Any]:
    """A transformers directory's config.json, after checking the directory holds safetensors weights."""
    folder = Path(cfg.weights)
    if not folder.is_dir():
        raise _fail(cfg, cfg.weights, "not a directory (expected a transformers save_pretrained folder)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _fail(cfg, cfg.weights, f"no readable config.json ({type(exc).__name__})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise _fail(cfg, cfg.weights, "no .safetensors weights (only safetensors are loaded)")
    for f in files:
        _safetensors_keys(cfg, f)
    return config


def _safetensors_keys(cfg: ScorerConfig, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (reads no tensor data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        raise _fail(cfg, str(path), f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def clip_embedding_dim(cfg: ScorerConfig) -> int:
    """Width of a clip scorer's image embeddings, from its config (checks it is a CLIP or SigLIP model)."""
    config = _read_config(cfg)
    kind = config.get("model_type")
    if kind not in CLIP_TYPES:
        raise _fail(cfg, cfg.weights, f"model_type {kind!r} is not one of {list(CLIP_TYPES)}")
    if (
        not (Path(cfg.weights) / "preprocessor_config.json").exists()
        and not (Path(cfg.weights) / "processor_config.json").exists()
    ):
        raise _fail(cfg, cfg.weights, "no processor files (save the processor beside the model)")
    if kind == "clip":
        return int(config.get("projection_dim", 512))
    return int(config.get("vision_config", {}).get("hidden_size", 768))


def aesthetic_layout(cfg: ScorerConfig) -> tuple[str, int]:
    """("mlp" | "linear", input width) of an aesthetic head file; anything else is an error."""
    path = Path(cfg.weights)
    if not path.is_file():
        raise _fail(cfg, cfg.weights, "no such file (expected a safetensors file)")
    shapes = _safetensors_keys(cfg, path)
    if set(shapes) == {"weight", "bias"} and len(shapes["weight"]) == 2 and shapes["weight"][0] == 1:
        return "linear", shapes["weight"][1]
    want = {f"{layer}.{p}" for layer in AESTHETIC_MLP for p in ("weight", "bias")}
    if set(shapes) != want or shapes["layers.7.weight"][0] != 1:
        raise _fail(cfg, cfg.weights, f"tensors {sorted(shapes)[:6]} are not a LAION aesthetic head layout")
    return "mlp", shapes["layers.0.weight"][1]


def check_scorers(cfgs: Sequence[ScorerConfig]) -> None:
    """Job start: every scorer's weights exist and fit its architecture (headers and configs only)."""
    validate_scorer_set(cfgs)
    dims = {c.name: clip_embedding_dim(c) for c in cfgs if c.model == "clip"}
    for c in cfgs:
        if c.model in TENSOR_MODELS and not Path(c.weights).is_file():
            raise _fail(c, c.weights, "no such file")
        if c.model == "aesthetic":
            _, width = aesthetic_layout(c)
            if width != dims[c.embedding]:
                raise _fail(
                    c,
                    c.weights,
                    f"takes {width}-d embeddings; clip scorer {c.embedding!r} gives "
                    f"{dims[c.embedding]}-d (a LAION head needs CLIP ViT-L/14: 768)",
                )
        if c.model == "image_classifier":
            labels = _read_config(c).get("id2label", {})
            if c.label not in labels.values():
                raise _fail(c, c.weights, f"label {c.label!r} is not one of its classes {sorted(labels.values())}")
        if c.model == "nudenet":
            _nudenet_model_path(c)
            unknown = sorted(set(c.classes) - set(nudenet_labels()))
            if unknown:
                raise _fail(c, c.weights or "nudenet", f"classes {unknown} are not among {nudenet_labels()}")


def build_aesthetic_head(cfg: ScorerConfig) -> Any:
    """The head as an nn.Module with the file's weights (the original's dropouts are no-ops at inference)."""
    from safetensors.torch import load_file
    from torch import nn

    layout, width = aesthetic_layout(cfg)
    if layout == "linear":
        head: nn.Module = nn.Linear(width, 1)
    else:
        dims = [width, 1024, 128, 64, 16, 1]
        lin = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
        # index-aligned with the original nn.Sequential (Linear, Dropout, ...) so its keys load as they are
        layers = nn.Sequential(lin[0], nn.Identity(), lin[1], nn.Identity(), lin[2], nn.Identity(), lin[3], lin[4])
        head = nn.Sequential(OrderedDict(layers=layers))
    head.load_state_dict(load_file(cfg.weights))
    return head.eval()


class ClipScorer:
    """A CLIP / SigLIP model and the aesthetic heads that read its image embeddings."""

    def __init__(self, cfg: ScorerConfig, heads: Sequence[ScorerConfig] = (), keep_embedding: bool = False) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        clip_embedding_dim(cfg)
        self.cfg, self.keep_embedding = cfg, keep_embedding
        self.device = torch.device(cfg.device)
        self.model = AutoModel.from_pretrained(cfg.weights, local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(cfg.weights, local_files_only=True)
        self.siglip = self.model.config.model_type == "siglip"
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.heads = {h.name: build_aesthetic_head(h).to(self.device) for h in heads}

    def _features(self, out: Any) -> Any:
        import torch

        emb = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def _text_embeddings(self, texts: list[str]) -> Any:
        # SigLIP was trained on texts padded to its full length; CLIP on the longest in the batch
        padding = "max_length" if self.siglip else True
        tok = self.processor.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        return self._features(self.model.get_text_features(**tok))

    def _score_chunk(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> dict[str, Any]:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        img = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        sim = np.full(len(images), np.nan)
        have = [i for i, t in enumerate(texts) if t]
        if have:
            txt = self._text_embeddings([texts[i] for i in have])
            sim[have] = (img[have] * txt).sum(-1).double().cpu().numpy()
        out: dict[str, Any] = {self.cfg.name: sim, EMBEDDING: img.cpu().numpy().astype(np.float32)}
        for name, head in self.heads.items():
            out[name] = head(img).reshape(-1).double().cpu().numpy()
        return out

    def score_batch(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> dict[str, np.ndarray]:
        import torch

        parts: list[dict[str, Any]] = []
        with torch.inference_mode():
            for i in range(0, len(images), self.cfg.batch_size):
                sl = slice(i, i + self.cfg.batch_size)
                parts.append(self._score_chunk(images[sl], texts[sl]))
        if not parts:
            return {}
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not self.keep_embedding:
            out.pop(EMBEDDING)
        return out


def _nudenet_model_path(cfg: ScorerConfig) -> str:
    try:
        import nudenet
    except ImportError:
        raise _fail(
            cfg, cfg.weights or "nudenet", "the nudenet package is not installed (pip install 'janus-pipeline[nsfw]')"
        ) from None
    path = cfg.weights or str(Path(nudenet.__file__).parent / "320n.onnx")
    if not Path(path).is_file():
        raise _fail(cfg, path, "no such ONNX file")
    return path


def nudenet_labels() -> list[str]:
    import nudenet.nudenet as nn_module

    return list(vars(nn_module)["__labels"])  # the detector's class names, in output order


class NudeNetScorer:
    """NudeNet's ONNX detector: the score is the highest confidence of an exposed-body-part detection."""

    def __init__(self, cfg: ScorerConfig) -> None:
        import onnxruntime
        from nudenet import NudeDetector

        self.cfg = cfg
        self.classes = set(cfg.classes or NUDENET_EXPOSED)
        path = _nudenet_model_path(cfg)
        self.detector = NudeDetector(model_path=path)
        if cfg.device == "cuda":  # NudeDetector builds a CPU session; a GPU actor swaps in a CUDA one
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self.detector.onnx_session = onnxruntime.InferenceSession(path, providers=providers)

    def score_batch(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> dict[str, np.ndarray]:
        # RGBA arrays: NudeNet converts RGBA -> BGR itself, so the channel order is unambiguous
        arrays = [np.asarray(im.convert("RGBA")) for im in images]
        found = self.detector.detect_batch(arrays, batch_size=self.cfg.batch_size)
        scores = [max((d["score"] for d in dets if d["class"] in self.classes), default=0.0) for dets in found]
        return {self.cfg.name: np.asarray(scores, dtype=np.float64)}


class ClassifierScorer:
    """A transformers image classifier; the score is the probability of one class (e.g. "watermark")."""

    def __init__(self, cfg: ScorerConfig) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        check_scorers([cfg])
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        model = AutoModelForImageClassification.from_pretrained(cfg.weights, local_files_only=True)
        self.model = model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(cfg.weights, local_files_only=True)
        self.index = {v: int(k) for k, v in self.model.config.id2label.items()}[cfg.label]

    def score_batch(self, images: Sequence[Image.Image], texts: Sequence[str | None]) -> dict[str, np.ndarray]:
        import torch

        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(images), self.cfg.batch_size):
                pixels = self.processor(images=list(images[i : i + self.cfg.batch_size]), return_tensors="pt")
                logits = self.model(pixel_values=pixels["pixel_values"].to(self.device)).logits.float()
                probs = torch.sigmoid(logits) if logits.shape[-1] == 1 else logits.softmax(-1)
                out.append(probs[:, self.index].double().cpu().numpy())
        return {self.cfg.name: np.concatenate(out) if out else np.empty(0)}
