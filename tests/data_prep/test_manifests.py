"""The manifests stages hand each other: one dataclass per file, written and read the same way on both sides;
another version or a missing field is refused naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.manifests import (
    CURATED_MANIFEST_VERSION,
    MANIFEST_NAME,
    STAGE_MANIFEST_VERSION,
    CuratedManifest,
    ManifestError,
    StageManifest,
)
from data_prep.stage_plan import load_source
from tests.data_prep.mix_fixtures import write_source, write_stage_folder
from training.stages import count_samples


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_curated_manifest_round_trips_and_feeds_the_mix(tmp_path: Path) -> None:
    folder = write_source(tmp_path, "digits", "class_label", 30, per_shard=20)
    path = folder / MANIFEST_NAME
    manifest = CuratedManifest.read(path)
    assert manifest.manifest_version == CURATED_MANIFEST_VERSION and manifest.kept == 30
    assert [s.samples for s in manifest.shards] == [20, 10]
    assert json.loads(path.read_text()) == manifest.to_dict()  # the on-disk keys are the dataclass's fields
    assert len(load_source("digits", folder)) == 30


def test_stage_manifest_round_trips_and_training_counts_from_it(tmp_path: Path) -> None:
    tars = write_stage_folder(tmp_path / "stage", samples=6)
    manifest = StageManifest.read(tmp_path / "stage" / MANIFEST_NAME)
    assert manifest.manifest_version == STAGE_MANIFEST_VERSION and manifest.samples == 6
    assert all(s.bytes == 1024 and len(s.sha256) == 64 for s in manifest.shards)  # filled when finalised
    assert count_samples(tars) == 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest_version": 99}, "manifest_version 99 is not 1"),
        ({"manifest_version": None}, "missing field 'manifest_version'.*rerun pipelines.curate"),
        ({"kept": None}, "missing field 'kept'"),
        ({"kept": "30"}, "field 'kept' is str"),
        (
            {"shards": [{"name": "digits-000000.tar", "samples": 20, "bytes": 1}]},
            r"missing field 'shards\[0\]\.sha256'",
        ),
    ],
)
def test_curated_manifest_refuses_other_versions_and_missing_fields(tmp_path: Path, change: dict, message: str) -> None:
    path = write_source(tmp_path, "digits", "class_label", 30) / MANIFEST_NAME
    _edit(path, **change)
    with pytest.raises(ManifestError, match=message) as err:
        load_source("digits", path.parent)
    assert err.value.path == path and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"manifest_version": 2}, "manifest_version 2 is not 1.*rerun pipelines.mix"),
        ({"manifest_version": None}, "missing field 'manifest_version'"),
        ({"samples": None}, "missing field 'samples'"),
    ],
)
def test_stage_manifest_refuses_other_versions_and_missing_fields(tmp_path: Path, change: dict, message: str) -> None:
    tars = write_stage_folder(tmp_path / "stage")
    _edit(tmp_path / "stage" / MANIFEST_NAME, **change)
    with pytest.raises(ManifestError, match=message) as err:
        count_samples(tars)
    assert str(tmp_path / "stage" / MANIFEST_NAME) in str(err.value)


def test_a_file_that_is_not_a_manifest_is_named(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        StageManifest.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="not a JSON object"):
        CuratedManifest.read(path)
