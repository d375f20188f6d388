"""Cost per image of each curation scorer and of semantic dedup on this machine (CPU), in-process.

    .venv/bin/python benchmarks/scorer_cost.py [--images 16] [--threads 2] [--sizes tiny b32 l14] [--dedup 20000]

Models are built here with random weights (nothing is downloaded) in the shapes that matter for cost:
``tiny`` is the test suite's CLIP (2 layers of width 32 per tower, 32 px input) and ViT classifier; ``b32``
and ``l14`` have the layer counts, widths, patch sizes and 224 px input of CLIP ViT-B/32 and ViT-L/14 (the
LAION aesthetic predictor's backbone) and, for the classifier, of ViT-B/16. Random weights cost what trained
ones do. NudeNet is the detector shipped in its wheel (its size is fixed); the language identifier is
py3langid's shipped model. Images are scikit-image's photographs (512 px), scored through the same classes
the job's actors run (data_prep.model_scorers), each batch of --images images at once, after one warm-up
batch; the figure is the best of --rounds rounds. Semantic dedup: --dedup random 768-d unit embeddings in
clusters of near copies, fitted, assigned and resolved in-process (the job runs the same functions in Ray
tasks), reported per image.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data_prep.captions import LanguageChecker, repair_text
from data_prep.dedup import SemanticConfig
from data_prep.filters import FilterConfig
from data_prep.model_scorers import ClassifierScorer, ClipScorer, NudeNetScorer
from data_prep.scorers import ScorerConfig
from data_prep.semdedup import assign_clusters, fit_centroids, resolve_cluster

CLIP_SHAPES = {
    # vision (layers, width, heads, patch, image), text (layers, width, heads), projection
    "tiny": ((2, 32, 2, 8, 32), (2, 32, 2), 16),
    "b32": ((12, 768, 12, 32, 224), (12, 512, 8), 512),
    "l14": ((24, 1024, 16, 14, 224), (12, 768, 12), 768),
}
VIT_SHAPES = {"tiny": (2, 32, 2, 8, 32), "b32": (12, 768, 12, 16, 224)}
"""The classifier's shapes: tiny, and ViT-B/16 (run with the b32 CLIP)."""
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png")
CAPTIONS = ("a photograph of an astronaut in a white suit", "a cup of coffee on a saucer", "une tasse de café")


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet)}
    vocab.update({t + "</w>": len(alphabet) + i for i, t in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_clip(folder: Path, size: str) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    (vl, vw, vh, patch, image), (tl, tw, th), proj = CLIP_SHAPES[size]
    tok = clip_tokenizer()
    vision = {"num_hidden_layers": vl, "hidden_size": vw, "intermediate_size": 4 * vw, "num_attention_heads": vh}
    text = {"num_hidden_layers": tl, "hidden_size": tw, "intermediate_size": 4 * tw, "num_attention_heads": th}
    cfg = CLIPConfig(
        vision_config={**vision, "patch_size": patch, "image_size": image},
        text_config={**text, "vocab_size": len(tok), "max_position_embeddings": 77},
        projection_dim=proj,
    )
    CLIPModel(cfg).save_pretrained(folder)
    crop = {"height": image, "width": image}
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": image}, crop_size=crop), tok).save_pretrained(folder)
    return str(folder)


def save_head(path: Path, width: int) -> str:
    from safetensors.torch import save_file

    dims = [width, 1024, 128, 64, 16, 1]
    state = {}
    for i, idx in enumerate((0, 2, 4, 6, 7)):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        state.update({f"layers.{idx}.weight": lin.weight.detach(), f"layers.{idx}.bias": lin.bias.detach()})
    save_file(state, str(path))
    return str(path)


def save_vit(folder: Path, size: str) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    layers, width, heads, patch, image = VIT_SHAPES[size]
    cfg = ViTConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=image,
        id2label={0: "clear", 1: "watermark"},
        label2id={"clear": 0, "watermark": 1},
    )
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": image, "width": image}).save_pretrained(folder)
    return str(folder)


def per_image(fn, n: int, rounds: int) -> float:
    """Best of ``rounds`` timings of ``fn()`` (one batch of n), after a warm-up call; ms per image."""
    fn()
    best = min(_timed(fn) for _ in range(rounds))
    return 1000.0 * best / n


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_rows(root: Path, sizes: list[str], images: list, texts: list, rounds: int) -> list[tuple]:
    rows = []
    n = len(images)
    for size in sizes:
        clip = ScorerConfig(name="clip", model="clip", weights=save_clip(root / f"clip_{size}", size), batch_size=n)
        width = CLIP_SHAPES[size][2]
        head = ScorerConfig(
            name="aes", model="aesthetic", weights=save_head(root / f"aes_{size}.safetensors", width), embedding="clip"
        )
        start = time.perf_counter()
        scorer = ClipScorer(clip, [head], keep_embedding=True)
        load = time.perf_counter() - start
        ms = per_image(lambda s=scorer: s.score_batch(images, texts), n, rounds)
        params = sum(p.numel() for p in scorer.model.parameters()) / 1e6
        rows.append((f"clip + aesthetic head ({size})", f"{params:.1f}M", f"{load:.1f}", f"{ms:.1f}"))
        emb = torch.nn.functional.normalize(torch.randn(4096, width), dim=-1)
        aes = scorer.heads["aes"]
        with torch.inference_mode():
            ms = per_image(lambda e=emb, h=aes: h(e), len(emb), rounds)
        head_params = sum(p.numel() for p in aes.parameters()) / 1e6
        rows.append((f"  aesthetic head alone ({width}-d)", f"{head_params:.2f}M", "-", f"{ms:.4f}"))
        del scorer
        if size not in VIT_SHAPES:
            continue
        wm = ScorerConfig(name="wm", model="image_classifier", weights=save_vit(root / f"vit_{size}", size),
                          label="watermark", batch_size=n)  # fmt: skip
        start = time.perf_counter()
        classifier = ClassifierScorer(wm)
        load = time.perf_counter() - start
        ms = per_image(lambda c=classifier: c.score_batch(images, texts), n, rounds)
        params = sum(p.numel() for p in classifier.model.parameters()) / 1e6
        label = "ViT-B/16" if size != "tiny" else "tiny"
        rows.append((f"watermark classifier ({label})", f"{params:.1f}M", f"{load:.1f}", f"{ms:.1f}"))
        del classifier
    start = time.perf_counter()
    nude = NudeNetScorer(ScorerConfig(name="nsfw", model="nudenet", batch_size=n))
    load = time.perf_counter() - start
    ms = per_image(lambda: nude.score_batch(images, texts), n, rounds)
    rows.append(("nsfw: NudeNet YOLOv8n 320 px (shipped, 12 MB ONNX)", "-", f"{load:.1f}", f"{ms:.1f}"))
    return rows


def text_rows(rounds: int) -> list[tuple]:
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(2000)]
    start = time.perf_counter()
    checker = LanguageChecker()
    load = time.perf_counter() - start
    cfg = FilterConfig(languages=["en"])
    lang = per_image(lambda: checker.check(captions, cfg), len(captions), rounds)
    fix = per_image(lambda: [repair_text(c) for c in captions], len(captions), rounds)
    return [
        ("caption language: py3langid (shipped), 17 candidates", "-", f"{load:.1f}", f"{lang:.3f}"),
        ("caption repair: ftfy.fix_text", "-", "-", f"{fix:.3f}"),
    ]


def dedup_row(n: int, dim: int = 768) -> tuple:
    """Semantic dedup on n embeddings: 1/3 are near copies of others; clusters of ~1000 (the default)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n - n // 3, dim))
    copies = base[rng.integers(0, len(base), n // 3)] + rng.normal(scale=0.1, size=(n // 3, dim))
    emb = np.concatenate([base, copies])[rng.permutation(n)]
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    cfg = SemanticConfig(enabled=True, threshold=0.95)
    import pyarrow as pa

    start = time.perf_counter()
    k = max(1, n // 1000)
    centroids = fit_centroids(k, cfg, pa.table({"order": np.arange(n), "embedding": list(emb)}))
    cluster = assign_clusters(emb, centroids)
    dropped = 0
    for c in range(k):
        d, _ = resolve_cluster(emb[cluster == c], cfg.threshold)
        dropped += len(d)
    seconds = time.perf_counter() - start
    return (f"semantic dedup, {n} x {dim}-d, {k} clusters ({dropped} dropped)", "-", "-", f"{1000 * seconds / n:.3f}")


def main() -> None:
    import skimage
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images per batch")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "b32", "l14"], choices=sorted(CLIP_SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dedup", type=int, default=20000, help="embeddings for the semantic dedup figure (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = Path(skimage.__file__).parent / "data"
    images = [Image.open(data / PHOTOS[i % len(PHOTOS)]).convert("RGB") for i in range(args.images)]
    texts = [CAPTIONS[i % 2] for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = model_rows(Path(tmp), args.sizes, images, texts, args.rounds)
    rows += text_rows(args.rounds)
    if args.dedup:
        rows.append(dedup_row(args.dedup))
    load = os.getloadavg()[0]
    print(f"{args.images} images of ~512 px per batch, {args.threads} threads, best of {args.rounds} rounds, "
          f"1-minute load average at the end {load:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"| {'scorer':58} | params | load s | ms / image |")
    print(f"|{'-' * 60}|--------|--------|------------|")
    for name, params, load, ms in rows:
        print(f"| {name:58} | {params:>6} | {load:>6} | {ms:>10} |")


if __name__ == "__main__":
    main()
