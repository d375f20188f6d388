"""Model-based scorers. The model is a tiny, randomly initialised CNN saved to tmp_path: these tests check the
mechanics (weights loaded from a local path, scores in the metadata, thresholds, the Ray actor pool), not
the quality of any real scorer."""

import json

import pytest
import torch
import webdataset as wds

from common.tracking import TrackingConfig
from data_prep.curation import CurateConfig, ExecConfig, run_curation
from data_prep.filters import FilterConfig
from data_prep.schema import decode_sample
from data_prep.scorers import ImageScorer, ScorerConfig, build_tiny_cnn
from data_prep.sources import SourceConfig
from tests.data_prep.curate_fixtures import pattern, ray_local, write_jsonl  # noqa: F401


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_cnn.pt"
    torch.save(build_tiny_cnn().state_dict(), path)
    return str(path)


def test_scorer_loads_weights_and_scores(weights):
    scorer = ImageScorer(ScorerConfig(name="aesthetic", model="tiny_cnn", weights=weights, input_size=32))
    images = [pattern(i) for i in range(5)]
    scores = scorer.score(images)
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 1  # depends on the image
    assert scorer.score(images) == scores


def test_scorer_config_validation(weights):
    with pytest.raises(ValueError, match=r"scorers\[a\]\.model"):
        ScorerConfig(name="a", model="clip_giant", weights=weights)
    with pytest.raises(ValueError, match="weights"):
        ScorerConfig(name="a", weights="")


@pytest.mark.ray
def test_job_runs_scorers_in_actor_pool_and_filters(weights, tmp_path, ray_local):  # noqa: F811
    folder = tmp_path / "src"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        pattern(100 + i).save(folder / "images" / f"{i}.png")
        rows.append({"id": f"s{i}", "image": f"images/{i}.png", "caption": f"a smooth picture number {i}"})
    write_jsonl(folder / "m.jsonl", rows)
    scorer = ImageScorer(ScorerConfig(name="aesthetic", model="tiny_cnn", weights=weights, input_size=32))
    # the threshold is the median of the scores of the images as the job stores them (within bounds: as is)
    raw = sorted(scorer.score([pattern(100 + i) for i in range(12)]))
    threshold = (raw[5] + raw[6]) / 2
    cfg = CurateConfig(
        sources=[
            SourceConfig(
                name="scored",
                kind="caption",
                format="jsonl",
                path=str(folder / "m.jsonl"),
                unit_size=4,
                filters=FilterConfig(min_scores={"aesthetic": threshold}),
            )
        ],
        out_dir=str(tmp_path / "out"),
        scorers=[ScorerConfig(name="aesthetic", model="tiny_cnn", weights=weights, input_size=32)],
        exec=ExecConfig(progress=False, scorer_actors=2),
        tracking=TrackingConfig(backend="none"),
    )
    (result,) = run_curation(cfg)
    assert (result["kept"], result["rejects_by_reason"]) == (6, {"score_aesthetic_low": 6})
    samples = [
        decode_sample(r)
        for r in wds.WebDataset(str(tmp_path / "out" / "scored" / "scored-000000.tar"), shardshuffle=False)
    ]
    assert all(s.meta.scores["aesthetic"] >= threshold for s in samples)
    manifest = json.loads((tmp_path / "out" / "scored" / "manifest.json").read_text())
    assert manifest["inputs"] == 12
