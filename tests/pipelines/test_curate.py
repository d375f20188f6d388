"""The curation job end to end on a real local Ray: accounting, reasons, dedup, read-back, reproducibility,
resume after injected failures, MLflow."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common import faults
from common.config import ConfigError, load_config
from common.faults import Fault
from common.tracking import TrackingConfig
from data_prep.curated_shards import DRILL_SHARD, ShardConfig
from data_prep.curation import DRILL_UNIT, AccountingError, CurateConfig, ExecConfig, finish_source, run_curation
from data_prep.imaging import ImageConfig
from data_prep.manifests import CuratedManifest
from data_prep.schema import decode_sample, make_key
from data_prep.sources import SourceConfig
from pipelines.curate import main, run
from tests.data_prep.curate_fixtures import build_world, ray_local  # noqa: F401
from tests.data_prep.dedup_reference import assert_job_agrees_with_reference

pytestmark = pytest.mark.ray
ORDER = ["photos", "captions", "folder", "charts", "hf", "text"]
EXPECTED = {
    "photos": (7, 7, {}),
    "captions": (
        25,
        6,
        {
            "bad_aspect_ratio": 1,
            "bad_column_type": 2,
            "bad_json": 1,
            "corrupt_image": 1,
            "decompression_bomb": 1,
            "duplicate_key": 1,
            "duplicate_near": 1,
            "empty_file": 1,
            "empty_text": 1,
            "missing_file": 1,
            "missing_image": 1,
            "non_utf8_text": 1,
            "score_clip_low": 1,
            "score_nsfw_high": 1,
            "text_too_short": 1,
            "too_small": 1,
            "truncated_image": 1,
            "unreadable_image": 1,
        },
    ),
    "folder": (7, 3, {"bad_json": 1, "duplicate_exact": 1, "missing_image": 1, "non_utf8_text": 1}),
    "charts": (5, 3, {"empty_conversation": 1, "missing_image": 1}),
    "hf": (4, 3, {"missing_label": 1}),
    "text": (5, 3, {"duplicate_text": 1, "empty_text": 1}),
}
MANIFEST_FIELDS = {
    "source",
    "kind",
    "task",
    "format",
    "schema_version",
    "inputs",
    "kept",
    "rejected",
    "rejects_by_reason",
    "bytes",
    "shards",
    "config_hash",
}


def make_cfg(specs: dict, out: Path, **exec_kw) -> CurateConfig:
    return CurateConfig(
        sources=[SourceConfig(**specs[n]) for n in ORDER],
        out_dir=str(out),
        image=ImageConfig(max_pixels=1_000_000),
        shards=ShardConfig(samples_per_shard=2),
        exec=ExecConfig(progress=False, **exec_kw),
        tracking=TrackingConfig(backend="none"),
    )


def source_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for n in ORDER for p in sorted((out / n).rglob("*")) if p.is_file()}


def ledger(folder: Path) -> dict[str, dict]:
    return {r["source_key"]: r for r in pq.read_table(folder / "rejects" / "rejects.parquet").to_pylist()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def run_a(world, tmp_path_factory, ray_local):  # noqa: F811
    """The reference run, through the CLI entry point with a real MLflow sqlite store."""
    root = tmp_path_factory.mktemp("run_a")
    cfg = make_cfg(world, root / "out", keep_work=True)
    data = json.loads(json.dumps(cfg, default=lambda o: o.__dict__))
    data["tracking"] = {"backend": "mlflow", "uri": f"sqlite:///{root}/mlflow.db", "experiment": "curate-test"}
    (root / "cfg.yaml").write_text(json.dumps(data))
    assert main(["--config", str(root / "cfg.yaml")]) == 0
    return root


def test_accounting_and_every_reason(run_a):
    for name, (inputs, kept, reasons) in EXPECTED.items():
        m = json.loads((run_a / "out" / name / "manifest.json").read_text())
        assert set(m) >= MANIFEST_FIELDS
        assert (m["inputs"], m["kept"], m["rejected"], m["rejects_by_reason"]) == (
            inputs,
            kept,
            inputs - kept,
            reasons,
        ), name
        ledger = pq.read_table(run_a / "out" / name / "rejects" / "rejects.parquet").to_pylist()
        assert len(ledger) == inputs - kept
        assert all(r["location"] and r["key"] and r["reason"] for r in ledger)
    charts = json.loads((run_a / "out" / "charts" / "manifest.json").read_text())
    assert charts["ignored_members"] == {"pyd": 1}


def test_dedup_across_sources_with_resized_real_photo(run_a):
    astro = make_key("photos", "astro")
    rej = ledger(run_a / "out" / "captions")
    assert (rej["astro_copy"]["reason"], rej["astro_copy"]["duplicate_of"]) == ("duplicate_near", astro)
    rej = ledger(run_a / "out" / "folder")
    assert (rej["astro"]["reason"], rej["astro"]["duplicate_of"]) == ("duplicate_exact", astro)


def test_dedup_agrees_with_the_single_pass_reference(run_a, world):
    # one each of duplicate_key, _near, _exact (across sources) and _text
    assert assert_job_agrees_with_reference(make_cfg(world, run_a / "out"), run_a / "out") == 4


def test_shards_contiguous_with_parquet_stats_and_sha(run_a):
    import hashlib

    for name in ORDER:
        folder = run_a / "out" / name
        m = json.loads((folder / "manifest.json").read_text())
        names = [s["name"] for s in m["shards"]]
        assert names == [f"{name}-{i:06d}.tar" for i in range(len(names))]
        assert sorted(p.name for p in folder.glob("*.tar")) == names
        for s in m["shards"]:
            tar = folder / s["name"]
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == s["sha256"]
            assert tar.stat().st_size == s["bytes"] and s["samples"] <= 2
            assert pq.read_table(tar.with_suffix(".parquet")).num_rows == s["samples"]
            assert json.loads((folder / f"{tar.stem}_stats.json").read_text())["samples"] == s["samples"]
        assert m["bytes"] == sum(s["bytes"] for s in m["shards"])


def test_read_back_with_webdataset_and_ray(run_a):
    import ray
    import webdataset as wds

    kept = 0
    for name in ORDER:
        tars = sorted(str(p) for p in (run_a / "out" / name).glob("*.tar"))
        samples = [decode_sample(r) for r in wds.WebDataset(tars, shardshuffle=False)]
        assert all(s.meta.source == name for s in samples)
        keys = [r["key"] for t in tars for r in pq.read_table(t.replace(".tar", ".parquet")).to_pylist()]
        assert [s.key for s in samples] == keys
        kept += len(samples)
        if name == "photos":
            by_key = {s.meta.source_key: s for s in samples}
            assert by_key["astro"].meta.width == 384 and by_key["astro"].image_ext == "jpg"  # resized
            assert (by_key["rotated"].meta.width, by_key["rotated"].meta.height) == (220, 300)
        if name == "charts":
            assert samples[0].meta.conversation[0].content.startswith("<image>")
        if name == "hf":
            assert [s.meta.class_name for s in samples] == ["cat", "dog", "cat"]
    assert kept == sum(v[1] for v in EXPECTED.values())
    ds = ray.data.read_webdataset(str(run_a / "out" / "captions"), decoder=None, file_extensions=["tar"])
    assert ds.count() == EXPECTED["captions"][1]


def test_mlflow_run(run_a):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_a}/mlflow.db")
    exp = client.get_experiment_by_name("curate-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "curate" and run.info.status == "FINISHED"
    assert run.data.metrics["captions.rejected.missing_file"] == 1
    assert run.data.metrics["images_per_s"] > 0
    assert run.data.params["image.short_side"] == "384"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifests", "grids", "rejects_summary.json", "config.resolved.yaml"} <= arts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert "grids/photos.png" in grids and "grids/text.png" not in grids


def test_byte_reproducible(run_a, world, tmp_path):
    cfg = make_cfg(world, tmp_path / "out", num_cpus=1)
    run_curation(cfg)
    assert source_files(tmp_path / "out") == source_files(run_a / "out")


@pytest.mark.slow
def test_resume_after_failure_in_a_unit(run_a, world, tmp_path):
    out = tmp_path / "out"
    drill = Fault(DRILL_UNIT, "raise", when={"unit": 5})
    with faults.arm(drill), pytest.raises(Exception, match="fault drill at curate.unit"):
        run_curation(make_cfg(world, out, keep_work=True))
    staged = {p: p.stat().st_mtime_ns for p in (out / "_work").rglob("unit-*.parquet")}
    assert 0 < len(staged) < 11  # part of the work was done
    assert not (out / "photos" / "manifest.json").exists()
    run_curation(make_cfg(world, out, keep_work=True))
    assert all(p.stat().st_mtime_ns == t for p, t in staged.items())  # done units were not redone
    assert source_files(out) == source_files(run_a / "out")


@pytest.mark.slow
def test_resume_after_failure_while_writing_shards(run_a, world, tmp_path):
    out = tmp_path / "out"
    drill = Fault(DRILL_SHARD, "raise", when={"shard": 4})  # captions-000000
    with faults.arm(drill), pytest.raises(Exception, match="fault drill at curate.shard"):
        run_curation(make_cfg(world, out))
    # the tar of the failed shard may be complete, but without its stats it is not done
    assert (out / "captions" / "captions-000000.tar").exists()
    assert not (out / "captions" / "captions-000000_stats.json").exists()
    run_curation(make_cfg(world, out))
    assert source_files(out) == source_files(run_a / "out")
    assert not (out / "_work").exists()


def test_accounting_mismatch_fails_loudly(tmp_path):
    cfg = CurateConfig(sources=[SourceConfig(name="s", kind="text", format="jsonl", path="x")], out_dir=str(tmp_path))
    units = [{"inputs": 3, "ignored_members": {}, "seconds": 0.1}]
    stats = [{"shard": "s-000000.tar", "samples": 1, "bytes": 10240, "sha256": "0"}]
    with pytest.raises(AccountingError, match="inputs 3 != kept 1 \\+ rejected 1"):
        finish_source(cfg, cfg.sources[0], units, stats, {"empty_text": 1}, "h")
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("key", ["fail_at_unit", "fail_at_shard", "kill_at_unit"])
def test_a_recipe_with_the_old_fault_settings_is_refused(key):
    """Fault drills are armed through common.faults, never by a job's config: the old keys are unknown."""
    with pytest.raises(ConfigError, match=key):
        load_config(CurateConfig, None, [f"exec.{key}=3"])


def test_config_rejects_duplicate_and_reserved_names():
    src = SourceConfig(name="s", kind="text", format="jsonl", path="x")
    with pytest.raises(ValueError, match="duplicate names"):
        CurateConfig(sources=[src, src])
    with pytest.raises(ValueError, match="sources is empty"):
        CurateConfig(sources=[])


def test_failed_work_dir_of_other_config_is_discarded(world, tmp_path, ray_local):  # noqa: F811
    out = tmp_path / "out"
    specs = {"text": world["text"]}
    cfg = CurateConfig(
        sources=[SourceConfig(**specs["text"])],
        out_dir=str(out),
        exec=ExecConfig(progress=False, keep_work=True),
        tracking=TrackingConfig(backend="none"),
    )
    run_curation(cfg)
    stamp = (out / "_work" / "config_hash").read_text()
    cfg.dedup.text = False
    (result,) = run_curation(cfg)
    assert (out / "_work" / "config_hash").read_text() != stamp
    assert result["kept"] == 4 and result["rejects_by_reason"] == {"empty_text": 1}
    shutil.rmtree(out)


def test_run_says_where_each_curated_source_is(world, tmp_path, ray_local):  # noqa: F811
    """``run`` hands the next job each source's manifest (what the demo chains into the mix)."""
    cfg = CurateConfig(
        sources=[SourceConfig(**world["text"])],
        out_dir=str(tmp_path / "out"),
        exec=ExecConfig(progress=False),
        tracking=TrackingConfig(backend="none"),
    )
    result = run(cfg)
    assert result.out_dir == (tmp_path / "out").absolute() and list(result.manifests) == ["text"]
    manifest = CuratedManifest.read(result.manifests["text"])
    assert result.kept == {"text": manifest.kept} and manifest.kept == 3
