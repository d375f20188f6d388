"""Real scorer architectures at tiny sizes, saved the way a user would give them to the job: a CLIP model and
its processor (``save_pretrained``), a LAION-layout aesthetic head (safetensors), a ViT image classifier
with a "watermark" class (``save_pretrained``). Weights are random unless said otherwise; nothing is
downloaded (the CLIP tokenizer is byte-level with no merges, built in code)."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.data_prep.curate_fixtures import photo

CLIP_SIZE = 32
"""Input resolution of the tiny CLIP (and classifier)."""
EMBED_DIM = 16
"""The tiny CLIP's projection width (what an aesthetic head must take)."""
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png")


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet)}
    vocab.update({t + "</w>": len(alphabet) + i for i, t in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(seed: int = 0):
    """A CLIPModel (2 layers of width 32 per tower, 16-d projections) and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer()
    size = {"shortest_edge": CLIP_SIZE}
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}),
        tokenizer=tok,
    )
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={**tower, "vocab_size": len(tok), "max_position_embeddings": 77},
        vision_config={**tower, "image_size": CLIP_SIZE, "patch_size": 8},
        projection_dim=EMBED_DIM,
    )
    torch.manual_seed(seed)
    return CLIPModel(cfg).eval(), proc


def save_clip(folder: Path, model=None, proc=None) -> str:
    if model is None:
        model, proc = tiny_clip()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def save_siglip(folder: Path, seed: int = 0) -> str:
    """A SiglipModel (towers of width 32, no projection: embeddings are the vision width) and a processor
    with the byte-level tokenizer (SigLIP's own is a sentencepiece model we cannot build offline)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = clip_tokenizer()
    image = SiglipImageProcessor(size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = SiglipConfig(
        text_config={**tower, "vocab_size": len(tok), "max_position_embeddings": 16},
        vision_config={**tower, "image_size": CLIP_SIZE, "patch_size": 8},
    )
    torch.manual_seed(seed)
    SiglipModel(cfg).save_pretrained(folder)
    SiglipProcessor(image_processor=image, tokenizer=tok).save_pretrained(folder)
    return str(folder)


def augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (60-100% of each side) with a random colour shift: the kind of copy semantic dedup is for."""
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    arr = np.asarray(im.crop((x, y, x + cw, y + ch)).resize((64, 64)), dtype=np.float32) + rng.uniform(-50, 50, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def trained_clip(views: int = 32, steps: int = 100, seed: int = 0):
    """The tiny CLIP with its vision tower trained for a few seconds (supervised contrastive loss on fixed
    augmented views of PHOTOS) to map crops and colour shifts of a photograph onto each other. A random
    tower maps every photograph to nearly the same direction (cosine > 0.95 between unrelated photos);
    this one tells them apart the way a real CLIP does, which is what semantic dedup needs to be tested on."""
    model, proc = tiny_clip(seed)
    rng = np.random.default_rng(seed)
    images = [augment(photo(n), rng) for n in PHOTOS for _ in range(views)]
    labels = torch.arange(len(PHOTOS)).repeat_interleave(views)
    pixels = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
    eye = torch.eye(len(labels), dtype=torch.bool)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters()]
    opt = torch.optim.AdamW(params, 3e-3)
    model.train()
    for _ in range(steps):
        z = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        logp = (z @ z.T / 0.1).masked_fill(eye, -1e9).log_softmax(-1)
        loss = -(logp * positive).sum(1).div(positive.sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), proc


def save_aesthetic_head(path: Path, width: int = EMBED_DIM, layout: str = "mlp", seed: int = 0) -> str:
    """A LAION aesthetic head with random weights: the improved predictor's MLP, or the first linear one."""
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(seed)
    if layout == "linear":
        state = nn.Linear(width, 1).state_dict()
    else:
        dims = [width, 1024, 128, 64, 16, 1]
        layers = OrderedDict()
        for i, idx in enumerate((0, 2, 4, 6, 7)):
            layers[str(idx)] = nn.Linear(dims[i], dims[i + 1])
        state = {f"layers.{k}": v for k, v in nn.Sequential(layers).state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def save_watermark_classifier(folder: Path, seed: int = 0) -> str:
    """A tiny ViTForImageClassification with classes clear / watermark, and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        image_size=CLIP_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        id2label={0: "clear", 1: "watermark"},
        label2id={"clear": 0, "watermark": 1},
    )
    torch.manual_seed(seed)
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(folder)
    return str(folder)


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
