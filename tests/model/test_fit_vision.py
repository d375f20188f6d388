"""The understanding encoder's contrastive pre-fit learns what the texts name; both families load it exactly, and
a stage that starts from an earlier stage keeps the tower that stage trained."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from common.config import load_config
from model.fit_vision import (
    Pair,
    apply_vision,
    build_vision,
    fit_vision,
    load_vision,
    qa_tokens,
    retrieval_top1,
    sigmoid_loss,
    vision_module,
    words,
)
from model.janus_pro import build_janus_pro
from model.janusflow import build_janusflow
from model.weights import StageWeights
from training.config import TrainConfig
from training.runner import build_stage_model

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def _shape_image(rng: np.random.Generator, colour: str, kind: str) -> bytes:
    img = Image.new("RGB", (64, 64), "white")
    x, y = (int(v) for v in rng.integers(4, 34, size=2))
    size = int(rng.integers(18, 28))
    draw = ImageDraw.Draw(img)
    box = (x, y, x + size, y + size)
    if kind == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pairs(n: int, seed: int) -> list[Pair]:
    """Colour x kind on white, at random places and sizes: only the texts say which is which."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        colour, kind = list(COLOURS)[i % 2], ("square", "triangle")[(i // 2) % 2]
        out.append(Pair(_shape_image(rng, colour, kind), (colour, kind), "shapes"))
    return out


def test_texts_become_bags_of_words_and_question_answer_tokens() -> None:
    assert words("A portrait of an Astronaut, 1969!") == ["a", "portrait", "of", "an", "astronaut", "1969"]
    conversation = [
        {"role": "user", "content": "<image>\nWhich bar is highest?"},
        {"role": "assistant", "content": "C"},
        {"role": "user", "content": "Which bar is lowest?"},
        {"role": "assistant", "content": "A"},
    ]
    assert qa_tokens(conversation) == ["which_bar_is_highest=c", "which_bar_is_lowest=a"]
    assert Pair(b"", ("red", "two"), "s").text_key == Pair(b"", ("two", "red"), "s").text_key


def test_sigmoid_loss_rewards_matching_pairs_and_counts_equal_texts_as_positives() -> None:
    img = torch.eye(3)
    scale, bias = torch.tensor(np.log(10.0)), torch.tensor(-5.0)
    diagonal = torch.eye(3, dtype=torch.bool)
    assert sigmoid_loss(img, img, diagonal, scale, bias) < sigmoid_loss(img, img.flip(0), diagonal, scale, bias)
    # two images of the same text: calling their pair a negative costs more than calling it a positive
    txt = torch.stack([img[0], img[0], img[2]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert sigmoid_loss(txt, txt, same, scale, bias) < sigmoid_loss(txt, txt, diagonal, scale, bias)


def test_fit_learns_to_match_held_out_images_to_their_texts(debug_flavor) -> None:
    train, heldout = _pairs(160, seed=0), _pairs(40, seed=1)
    vision, text, stats = fit_vision(debug_flavor, train, steps=200, lr=2e-3, seed=0, batch_size=32)
    before = build_vision(debug_flavor).eval()
    top1, chance = retrieval_top1(vision, text, heldout, debug_flavor.vision.image_size)
    random_top1, _ = retrieval_top1(before, text, heldout, debug_flavor.vision.image_size)
    print(f"held-out top-1 {top1:.2f} (random tower {random_top1:.2f}, chance {chance:.2f}), {stats}")
    assert chance == 0.25
    assert top1 >= 0.9 and top1 - random_top1 >= 0.3
    assert stats["loss_last"] < stats["loss_first"] / 3
    assert not any(p.requires_grad for p in vision.parameters())
    with pytest.raises(ValueError, match="no image-text pairs"):
        fit_vision(debug_flavor, [], steps=1)


def test_both_families_load_the_tower_and_compute_the_same_features(debug_flavor, tmp_path: Path) -> None:
    torch.manual_seed(3)
    tower = build_vision(debug_flavor).eval()
    tower.save_pretrained(tmp_path / "vision", safe_serialization=True)
    loaded = load_vision(tmp_path / "vision")
    x = torch.randn(2, 3, 64, 64)
    want = tower(pixel_values=x).last_hidden_state
    for model in (build_janus_pro(debug_flavor), build_janusflow(debug_flavor)):
        before = vision_module(model)(pixel_values=x).last_hidden_state
        apply_vision(model, loaded)
        got = vision_module(model)(pixel_values=x).last_hidden_state
        assert not torch.allclose(before, want) and torch.allclose(got, want, atol=1e-6), type(model).__name__


@torch.no_grad()
def test_a_stage_from_scratch_loads_the_tower_and_a_later_stage_keeps_its_own(debug_flavor, tmp_path: Path) -> None:
    torch.manual_seed(5)
    tower = build_vision(debug_flavor).eval()
    tower.save_pretrained(tmp_path / "vision", safe_serialization=True)
    cfg = load_config(
        TrainConfig,
        REPO / "configs" / "train" / "debug_janus_pro.yaml",
        ["tracking.backend=none", f"model.vision_path={tmp_path / 'vision'}"],
    )
    x = torch.randn(1, 3, 64, 64)
    want = tower(pixel_values=x).last_hidden_state
    *_, model, _, _ = build_stage_model(cfg, "I", None, torch.device("cpu"))
    assert torch.allclose(vision_module(model)(pixel_values=x).last_hidden_state, want, atol=1e-6)
    # stage II starts from stage I's weights, whose tower has moved: those are kept
    vision_module(model).post_layernorm.bias.add_(1.0)
    moved = vision_module(model)(pixel_values=x).last_hidden_state
    StageWeights(stage="I", steps=1, family="janus_pro", flavor="debug").write(tmp_path / "I", model.state_dict())
    *_, model2, _, _ = build_stage_model(cfg, "II", str(tmp_path / "I"), torch.device("cpu"))
    assert torch.allclose(vision_module(model2)(pixel_values=x).last_hidden_state, moved, atol=1e-6)


def test_bad_vision_inputs_are_named(tmp_path: Path) -> None:
    from data_prep.shards import write_tar
    from training.tokenizers import FitTokenizersConfig, VisionFitOptions, collect_pairs

    with pytest.raises(ValueError, match=r"vision\.sources: unknown \['pixels'\]"):
        VisionFitOptions(sources=["pixels"])
    with pytest.raises(ValueError, match="vision.enabled needs toyworld_dir"):
        FitTokenizersConfig(toyworld_dir=None, shards_dir=str(tmp_path), vision=VisionFitOptions(enabled=True))
    cfg = FitTokenizersConfig(
        toyworld_dir=str(tmp_path), vision=VisionFitOptions(enabled=True, sources=["charts_docs"])
    )
    with pytest.raises(FileNotFoundError, match=r"vision source 'charts_docs' has no .*charts_docs/train"):
        collect_pairs(cfg, "train")
    assert collect_pairs(cfg, "eval") == []  # no held-out split: nothing to measure, no error
    split = tmp_path / "charts_docs" / "train"
    split.mkdir(parents=True)
    write_tar(
        split / "charts_docs-000000.tar",
        [{"__key__": "train_000000", "png": _shape_image(np.random.default_rng(0), "red", "square")}],
    )
    with pytest.raises(
        ValueError,
        match=r"charts_docs-000000\.tar: sample 'train_000000' lacks a png image or its json \(has \['png'\]\)",
    ):
        collect_pairs(cfg, "train")
