"""The standard scorers in-process, on real architectures at tiny sizes and NudeNet's / py3langid's shipped
models, and the job-start checks that name the scorer and the path of bad weights."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.tracking import TrackingConfig
from data_prep.captions import LanguageChecker, repair_text
from data_prep.curation import CurateConfig, run_curation
from data_prep.filters import FilterConfig, filter_text
from data_prep.model_scorers import (
    ClassifierScorer,
    ClipScorer,
    NudeNetScorer,
    ScorerWeightsError,
    check_scorers,
    clip_embedding_dim,
)
from data_prep.scorers import EMBEDDING, ScorerConfig, scorer_groups
from data_prep.sources import SourceConfig
from tests.data_prep.curate_fixtures import photo
from tests.data_prep.model_fixtures import (
    EMBED_DIM,
    save_aesthetic_head,
    save_clip,
    save_siglip,
    save_watermark_classifier,
)

NAMES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {
        "clip": save_clip(root / "clip"),
        "mlp": save_aesthetic_head(root / "mlp.safetensors"),
        "linear": save_aesthetic_head(root / "linear.safetensors", layout="linear"),
        "wide": save_aesthetic_head(root / "wide.safetensors", width=768, layout="linear"),
        "wm": save_watermark_classifier(root / "wm"),
        "root": root,
    }


def clip_cfg(paths, **kw):
    return ScorerConfig(name="clip", model="clip", weights=paths["clip"], batch_size=3, **kw)


def test_clip_similarity_and_aesthetic_heads_share_one_embedding(paths):
    heads = [
        ScorerConfig(name="aes_mlp", model="aesthetic", weights=paths["mlp"], embedding="clip"),
        ScorerConfig(name="aes_lin", model="aesthetic", weights=paths["linear"], embedding="clip"),
    ]
    scorer = ClipScorer(clip_cfg(paths), heads, keep_embedding=True)
    images = [photo(n) for n in NAMES]
    texts = ["an astronaut", "a cup of coffee", None, "a rocket on its launch pad"]
    out = scorer.score_batch(images, texts)
    emb = out[EMBEDDING]
    assert emb.shape == (4, EMBED_DIM) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.isnan(out["clip"][2]) and np.all(np.abs(out["clip"][[0, 1, 3]]) <= 1 + 1e-6)
    # the heads read that very embedding: the LAION MLP (no activations) and the linear head, recomputed here
    w = load_file(paths["mlp"])
    x = torch.from_numpy(emb)
    for layer in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
        x = x @ w[f"{layer}.weight"].T + w[f"{layer}.bias"]
    np.testing.assert_allclose(out["aes_mlp"], x.reshape(-1).numpy(), rtol=1e-4, atol=1e-6)
    lin = load_file(paths["linear"])
    np.testing.assert_allclose(
        out["aes_lin"], (emb @ lin["weight"].numpy().T + lin["bias"].numpy()).reshape(-1), rtol=1e-4, atol=1e-6
    )
    # batching does not change a score; an image's score does not depend on its neighbours
    again = ClipScorer(clip_cfg(paths), keep_embedding=False).score_batch(images[::-1], texts[::-1])
    assert EMBEDDING not in again
    np.testing.assert_allclose(again["clip"][::-1], out["clip"], atol=1e-5)


def test_siglip_scores_with_its_full_length_padding(paths):
    folder = save_siglip(paths["root"] / "siglip")
    cfg = ScorerConfig(name="sig", model="clip", weights=folder, batch_size=2)
    assert clip_embedding_dim(cfg) == 32  # SigLIP has no projection: the vision width
    images = [photo(n) for n in NAMES[:3]]
    texts = ["an astronaut", None, "a cat " * 40]  # longer than its 16 positions: truncated, not an error
    out = ClipScorer(cfg, keep_embedding=True).score_batch(images, texts)
    assert out[EMBEDDING].shape == (3, 32) and np.isnan(out["sig"][1])
    assert np.all(np.abs(out["sig"][[0, 2]]) <= 1 + 1e-6)
    # text padded to the full length: the score of a caption does not depend on the batch's longest one
    alone = ClipScorer(cfg).score_batch(images[:1], texts[:1])["sig"]
    np.testing.assert_allclose(alone, out["sig"][:1], atol=1e-5)


def test_nudenet_shipped_model_detects_and_scores_exposed_parts_only():
    images = [photo(n) for n in NAMES]
    scores = NudeNetScorer(ScorerConfig(name="nsfw", model="nudenet", batch_size=2)).score_batch(images, [None] * 4)
    # the astronaut's face is detected but is not an exposed part; coffee.png draws a (false) "buttocks"
    face = NudeNetScorer(ScorerConfig(name="f", model="nudenet", classes=["FACE_FEMALE"])).score_batch(images[:1], [])
    assert face["f"][0] > 0.5 and scores["nsfw"][0] == 0.0
    assert 0.2 < scores["nsfw"][1] < 0.5 and scores["nsfw"][2] == scores["nsfw"][3] == 0.0


def test_watermark_classifier_gives_the_named_class_probability(paths):
    cfg = ScorerConfig(name="watermark", model="image_classifier", weights=paths["wm"], label="watermark")
    clear = ScorerConfig(name="clear", model="image_classifier", weights=paths["wm"], label="clear")
    images = [photo(n) for n in NAMES]
    p_wm = ClassifierScorer(cfg).score_batch(images, [])["watermark"]
    p_clear = ClassifierScorer(clear).score_batch(images, [])["clear"]
    np.testing.assert_allclose(p_wm + p_clear, 1.0, atol=1e-6)
    assert len(set(np.round(p_wm, 6))) > 1


def test_scorer_groups_put_heads_with_their_clip(paths):
    cfgs = [
        ScorerConfig(name="nsfw", model="nudenet"),
        clip_cfg(paths),
        ScorerConfig(name="aes", model="aesthetic", weights=paths["mlp"], embedding="clip"),
    ]
    assert [[c.name for c in g] for g in scorer_groups(cfgs)] == [["nsfw"], ["clip", "aes"]]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_dir", r"scorers\[clip\] \(clip\): .*nowhere: not a directory"),
        ("not_clip", r"scorers\[clip\] \(clip\): .*wm: model_type 'vit' is not one of"),
        ("truncated", r"scorers\[clip\] \(clip\): .*model.safetensors: not a readable safetensors file"),
        ("head_width", r"scorers\[aes\] \(aesthetic\): .*wide.safetensors: takes 768-d embeddings; clip scorer"),
        ("head_layout", r"scorers\[aes\] \(aesthetic\): .*model.safetensors: tensors .* not a LAION aesthetic"),
        ("label", r"scorers\[wm\] \(image_classifier\): .*wm: label 'logo' is not one of its classes"),
        ("nudenet_file", r"scorers\[nsfw\] \(nudenet\): .*nope.onnx: no such ONNX file"),
    ],
)
def test_bad_weights_fail_at_job_start_naming_scorer_and_path(paths, tmp_path, case, match):
    clip = clip_cfg(paths)
    if case == "missing_dir":
        cfgs = [ScorerConfig(name="clip", model="clip", weights=str(tmp_path / "nowhere"))]
    elif case == "not_clip":
        cfgs = [ScorerConfig(name="clip", model="clip", weights=paths["wm"])]
    elif case == "truncated":
        broken = tmp_path / "clip"
        shutil.copytree(paths["clip"], broken)
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
        cfgs = [ScorerConfig(name="clip", model="clip", weights=str(broken))]
    elif case in ("head_width", "head_layout"):
        head = paths["wide"] if case == "head_width" else str(paths["root"] / "wm" / "model.safetensors")
        cfgs = [clip, ScorerConfig(name="aes", model="aesthetic", weights=head, embedding="clip")]
    elif case == "label":
        cfgs = [ScorerConfig(name="wm", model="image_classifier", weights=paths["wm"], label="logo")]
    else:
        cfgs = [ScorerConfig(name="nsfw", model="nudenet", weights=str(tmp_path / "nope.onnx"))]
    with pytest.raises(ScorerWeightsError, match=match):
        check_scorers(cfgs)
    # the job fails the same way before it reads a sample or starts a Ray task
    src = SourceConfig(name="s", kind="caption", format="jsonl", path=str(tmp_path / "absent.jsonl"))
    cfg = CurateConfig(
        sources=[src], out_dir=str(tmp_path / "out"), scorers=cfgs, tracking=TrackingConfig(backend="none")
    )
    with pytest.raises(ScorerWeightsError, match=match):
        run_curation(cfg)


def test_caption_checks_repair_and_languages():
    assert repair_text("the cafÃ© â€œopenâ€\x9d sign") == 'the café "open" sign'
    cfg = FilterConfig(languages=["en"], max_char_run=4)
    checker = LanguageChecker()
    texts = ["a red bicycle leaning against a wall", "ein rotes Fahrrad lehnt an einer Wand", None]
    assert checker.check(texts, cfg)[0] is None and checker.check(texts, cfg)[2] is None
    assert checker.check(texts, cfg)[1].startswith("de ")
    assert checker.check(texts, FilterConfig()) == [None, None, None]  # no languages: the check is off
    assert filter_text("so good!!!!! yes", cfg) == (False, "text_repeated_chars")
    assert filter_text("so good!!!! yes", cfg) == (True, "")
    with pytest.raises(ValueError, match="filters.languages"):
        FilterConfig(languages=["english"])
    with pytest.raises(ValueError, match=r"\['xx'\] are not in filters.language_candidates"):
        FilterConfig(languages=["xx"])
