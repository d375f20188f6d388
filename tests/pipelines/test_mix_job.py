"""``python -m pipelines.mix``: every shipped toy recipe runs on toy-world sources and prints exact ratios."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from data_prep.manifests import MANIFEST_NAME, StageManifest
from data_prep.mixing import MixConfig
from data_prep.shards import read_samples
from pipelines.mix import main, run
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401 - session fixture
from tests.data_prep.mix_fixtures import write_toy_curated

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
TOY_RECIPES = ["mix_toy_janus_pro", "mix_toy_janusflow", "mix_toy_janusflow_pretrain"]
PAPER = {
    "mix_toy_janus_pro": "mix_janus_pro",
    "mix_toy_janusflow": "mix_janusflow",
    "mix_toy_janusflow_pretrain": "mix_janusflow_pretrain",
}


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_curated(tmp_path_factory.mktemp("curated"))


def ratios(cfg: MixConfig) -> dict:
    """Per stage: group ratios (or phases) by name, the recipe's mixture semantics."""
    out = {}
    for name, st in cfg.stages.items():
        groups = {g: v.ratio for g, v in st.groups.items() if v.ratio}
        phases = [{g: r for g, r in p.ratios.items() if r} for p in st.phases]
        out[name] = (groups, phases)
    return out


@pytest.mark.parametrize("recipe", TOY_RECIPES)
def test_toy_recipe_has_the_paper_ratios(recipe: str) -> None:
    toy = load_config(MixConfig, CONFIGS / f"{recipe}.yaml")
    paper = load_config(MixConfig, CONFIGS / f"{PAPER[recipe]}.yaml")
    assert ratios(toy) == ratios(paper)


def test_paper_numbers() -> None:
    jp = load_config(MixConfig, CONFIGS / "mix_janus_pro.yaml")
    got = {s: {g: v.ratio for g, v in st.groups.items()} for s, st in jp.stages.items()}
    assert got == {
        "stage1": {"understanding": 1, "text": 0, "generation": 3},
        "stage2": {"understanding": 2, "text": 3, "generation": 5},
        "stage3": {"understanding": 5, "text": 1, "generation": 4},
    }
    gen2 = jp.stages["stage2"].groups["generation"].sources
    assert {k: (v.weight, v.use_as) for k, v in gen2.items()} == {
        "image_captions": (1, "t2i"),
        "synthetic_aesthetic": (1, None),
    }
    assert jp.stages["stage1"].groups["generation"].sources.keys() == {"imagenet1k"}
    assert [st.num_samples for st in jp.stages.values()] == [20_000 * 256, 270_000 * 512, 80_000 * 128]
    j7 = load_config(MixConfig, CONFIGS / "mix_janus_pro_7b.yaml")
    assert j7.stages["stage3"].steps == 40_000 and j7.stages["stage2"].groups["text"].ratio == 3
    jf = load_config(MixConfig, CONFIGS / "mix_janusflow.yaml")
    assert {g: v.ratio for g, v in jf.stages["stage1"].groups.items()} == {
        "understanding": 50,
        "generation": 50,
        "text": 0,
    }
    ph = jf.stages["stage2"].phases
    assert (ph[0].steps, ph[0].ratios, ph[1].steps) == (
        10_000,
        {"understanding": 30, "generation": 50, "text": 20},
        None,
    )
    assert ph[1].ratios == {"understanding": 14, "generation": 80, "text": 6}
    assert {g: v.ratio for g, v in jf.stages["stage3"].groups.items()} == {
        "understanding": 21,
        "generation": 70,
        "text": 9,
    }
    pre = load_config(MixConfig, CONFIGS / "mix_janusflow_pretrain.yaml")
    assert {g: v.ratio for g, v in pre.stages["pretrain"].groups.items()} == {"understanding": 2, "generation": 8}


@pytest.mark.parametrize("recipe", TOY_RECIPES)
def test_toy_recipe_runs_and_prints_exact_ratios(
    recipe: str, curated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stages"
    shipped = load_config(MixConfig, CONFIGS / f"{recipe}.yaml")
    short = [f"stages.{name}.steps={min(st.steps, 40)}" for name, st in shipped.stages.items()]  # test-sized
    rc = main(
        [
            "--config",
            str(CONFIGS / f"{recipe}.yaml"),
            f"curated_dir={curated}",
            f"out_dir={out}",
            "tracking.backend=jsonl",
            *short,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    cfg = load_config(MixConfig, CONFIGS / f"{recipe}.yaml", short)
    for stage, st in cfg.stages.items():
        manifest = json.loads((out / cfg.recipe / stage / "manifest.json").read_text())
        assert manifest["samples"] == st.num_samples
        for g, info in manifest["groups"].items():
            assert abs(info["count"] - info["target_count"]) < 1, (stage, g)
            assert info["worst_shard_deviation"] < 1
            assert f"{stage:<14}{g:<15}{info['target_ratio']:>9.4f}{info['realised_ratio']:>10.4f}" in printed
        tars = sorted((out / cfg.recipe / stage).glob(f"{stage}-*.tar"))
        assert [t.name for t in tars] == [s["name"] for s in manifest["shards"]]
    assert (out / cfg.recipe / "config.resolved.yaml").is_file()
    assert (out / cfg.recipe / "mix.jsonl").is_file()


def test_mlflow_run_records_ratios(curated: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(
        [
            "--config",
            str(CONFIGS / "mix_toy_janusflow_pretrain.yaml"),
            f"curated_dir={curated}",
            f"out_dir={tmp_path / 'stages'}",
            f"tracking.uri={uri}",
            "tracking.experiment=mixtest",
        ]
    )
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mixtest")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "mix" and run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["pretrain/generation/target_ratio"] == metrics["pretrain/generation/realised_ratio"] == 0.8
    assert metrics["pretrain/understanding/realised_ratio"] == 0.2


def test_recipe_keys_are_strict(tmp_path: Path) -> None:
    path = CONFIGS / "mix_toy_janus_pro.yaml"
    cfg = load_config(MixConfig, path, ["stages.stage1.samples=96", "stages.stage2.groups.text.ratio=2"])
    assert cfg.stages["stage1"].num_samples == 96 and cfg.stages["stage2"].groups["text"].ratio == 2
    with pytest.raises(ConfigError, match="sampels"):
        load_config(MixConfig, path, ["stages.stage1.sampels=96"])
    with pytest.raises(ConfigError, match="not among"):
        load_config(MixConfig, path, ["stages.stage1.groups.images.ratio=1"])
    with pytest.raises(ConfigError, match="only"):
        load_config(MixConfig, path, ["only=[stage9]"])


@pytest.mark.ray
def test_job_precomputes_latents(ray_local: None, curated: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "stages"
    main(
        [
            "--config",
            str(CONFIGS / "mix_toy_janusflow_pretrain.yaml"),
            f"curated_dir={curated}",
            f"out_dir={out}",
            "tracking.backend=none",
            "stages.pretrain.steps=4",
            "precompute.kind=vae",
            "precompute.resolution=32",
        ]
    )
    stage = out / "toy_janusflow_pretrain" / "pretrain"
    manifest = json.loads((stage / "manifest.json").read_text())
    n_gen = manifest["groups"]["generation"]["count"]
    assert n_gen == 102  # 0.8 x 128, rounded down (within one of 102.4)
    assert manifest["precompute"]["field"] == "latent.npy" and manifest["precompute"]["encoded"] == n_gen
    samples = [s for t in sorted(stage.glob("*.tar")) for s in read_samples(t)]
    assert sum(s.latent is not None for s in samples) == n_gen  # every generation sample, nothing else
    assert all((s.latent is not None) == (s.meta.task == "t2i") for s in samples)
    for shard in manifest["shards"]:  # hashes are of the final (precomputed) bytes
        assert hashlib.sha256((stage / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


@pytest.mark.ray
def test_parallel_writers_and_locations_do_not_change_bytes(ray_local: None, curated: Path, tmp_path: Path) -> None:  # noqa: F811
    recipe = str(CONFIGS / "mix_toy_janusflow.yaml")
    short = ["stages.stage1.steps=30", "stages.stage2.steps=60", "stages.stage3.steps=40"]  # 960/1920/1280 samples
    main(["--config", recipe, f"curated_dir={curated}", f"out_dir={tmp_path / 'a'}", "tracking.backend=none", *short])
    main(
        [
            "--config",
            recipe,
            f"curated_dir={curated}",
            f"out_dir={tmp_path / 'b'}",
            "tracking.backend=none",
            "write_workers=2",
            *short,
        ]
    )
    a, b = tmp_path / "a" / "toy_janusflow", tmp_path / "b" / "toy_janusflow"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".tar", ".json"))
    assert len(files) == 3 + 5 + 10 + 7  # three manifests and every shard
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_run_says_where_each_stage_is(curated: Path, tmp_path: Path) -> None:
    """``run`` hands the next job each stage's folder and manifest (what the demo chains into training)."""
    overrides = [f"curated_dir={curated}", f"out_dir={tmp_path}", "tracking.backend=none", "only=[stage1]"]
    result = run(load_config(MixConfig, CONFIGS / "mix_toy_janus_pro.yaml", overrides))
    assert result.out_dir == tmp_path / "toy_janus_pro" and list(result.stage_dirs) == ["stage1"]
    assert StageManifest.read(result.stage_dirs["stage1"] / MANIFEST_NAME) == result.manifests["stage1"]
    assert sorted(p.name for p in result.stage_dirs["stage1"].glob("*.tar")) == [
        s.name for s in result.manifests["stage1"].shards
    ]
