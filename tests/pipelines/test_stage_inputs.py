"""A finished or half-trained stage is reused only when it was trained from the inputs asked for now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.io import folder_sha256, json_sha256
from tests.data_prep.mix_fixtures import write_stage_folder
from training.config import TrainConfig
from training.records import INPUTS_FILE, StageInputs, StageInputsChanged, check_stage_inputs

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "train" / "debug_janusflow.yaml"


def _shards(folder: Path, samples: int = 4) -> list[Path]:
    return write_stage_folder(folder, samples)


def _cfg(tmp_path: Path, *overrides: str) -> TrainConfig:
    vae = tmp_path / "vae"
    vae.mkdir(exist_ok=True)
    if not (vae / "config.json").exists():
        (vae / "config.json").write_text("{}")
    return load_config(TrainConfig, RECIPE, ["tracking.backend=none", f"model.vae_path={vae}", *overrides])


def test_same_inputs_are_reused_and_recorded_once(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")
    recorded = (folder / INPUTS_FILE).read_text()
    (folder / "final").mkdir()  # work done in the folder
    check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")
    assert (folder / INPUTS_FILE).read_text() == recorded
    assert json.loads(recorded)["inputs"]["stage"]["steps"] == 100


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("recipe", "stage.lr"),
        ("loss", "model.janusflow.t_mu"),
        ("shards", "shards.manifest_sha256"),
        ("vae", "tokenizers.vae_path"),
    ],
)
def test_changed_inputs_are_refused_with_what_changed(tmp_path: Path, change: str, named: str) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")
    overrides = {"recipe": ["stage.I.lr=5e-3"], "loss": ["model.janusflow.t_mu=0.0"]}.get(change, [])
    if change == "shards":
        tars = _shards(tmp_path / "shards", 5)
    if change == "vae":
        (tmp_path / "vae" / "config.json").write_text('{"refit": 1}')
    with pytest.raises(StageInputsChanged, match=named.replace(".", r"\.")) as err:
        check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path, *overrides), "I", None, tars), "I")
    assert str(folder) in str(err.value) and "delete" in str(err.value)


def test_a_pre_fitted_vision_tower_is_an_input_and_no_tower_hashes_as_before(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    plain = StageInputs.of(_cfg(tmp_path), "I", None, tars)
    assert "vision_path" not in plain.inputs["model"] and "vision_path" not in plain.inputs["tokenizers"]
    tower = tmp_path / "vision"
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    with_tower = StageInputs.of(_cfg(tmp_path, f"model.vision_path={tower}"), "I", None, tars)
    assert with_tower.inputs["tokenizers"]["vision_path"] == folder_sha256(tower)
    check_stage_inputs(folder, with_tower, "I")
    (tower / "config.json").write_text('{"refit": 1}')
    with pytest.raises(StageInputsChanged, match=r"tokenizers\.vision_path"):
        check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path, f"model.vision_path={tower}"), "I", None, tars), "I")


def test_a_retrained_previous_stage_invalidates_the_next(tmp_path: Path) -> None:
    tars, root = _shards(tmp_path / "shards"), tmp_path / "ckpt"
    cfg = _cfg(tmp_path)
    check_stage_inputs(root / "I", StageInputs.of(cfg, "I", None, tars), "I")
    (root / "I" / "final").mkdir()
    check_stage_inputs(root / "II", StageInputs.of(cfg, "II", root / "I" / "final", tars), "II")
    # stage I retrained from another recipe: its record changes, so stage II's start does too
    (root / "I" / INPUTS_FILE).unlink()
    check_stage_inputs(root / "I.new", StageInputs.of(_cfg(tmp_path, "stage.I.lr=5e-3"), "I", None, tars), "I")
    (root / "I" / INPUTS_FILE).write_text((root / "I.new" / INPUTS_FILE).read_text())
    with pytest.raises(StageInputsChanged, match=r"start\.previous_stage"):
        check_stage_inputs(root / "II", StageInputs.of(cfg, "II", root / "I" / "final", tars), "II")


def test_a_folder_from_before_the_record_is_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    (folder / "final").mkdir(parents=True)
    check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")
    assert "has no inputs.json; trusting" in caplog.text
    assert not (folder / INPUTS_FILE).exists()


def test_an_unreadable_record_is_named(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    folder.mkdir(parents=True)
    (folder / INPUTS_FILE).write_text("{not json")
    with pytest.raises(StageInputsChanged, match="unreadable stage record"):
        check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")


def test_records_of_another_schema_version_are_refused(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    check_stage_inputs(folder, StageInputs.of(_cfg(tmp_path), "I", None, tars), "I")
    record = json.loads((folder / INPUTS_FILE).read_text())
    assert record["schema_version"] == 1 and StageInputs.read(folder).sha256 == record["sha256"]
    (folder / INPUTS_FILE).write_text(json.dumps({**record, "schema_version": 2}))
    with pytest.raises(StageInputsChanged, match="schema version 2, this code reads 1"):
        StageInputs.read(folder)
    (folder / INPUTS_FILE).write_text(json.dumps({"sha256": record["sha256"]}))
    with pytest.raises(StageInputsChanged, match="no inputs field"):
        StageInputs.read(folder)


def test_stage_weights_record_round_trip_and_refusals(tmp_path: Path) -> None:
    import torch

    from model.weights import DONE_FILE, StageWeights, WeightsRecordError, load_weights

    record = StageWeights(stage="II", steps=3, family="janusflow", flavor="debug")
    record.write(tmp_path / "final", {"w": torch.ones(2)})
    assert StageWeights.read(tmp_path / "final") == record and torch.equal(
        load_weights(tmp_path / "final")["w"], torch.ones(2)
    )
    done = tmp_path / "final" / DONE_FILE
    done.write_text(json.dumps({"stage": "II", "steps": 3, "family": "janusflow"}))
    with pytest.raises(WeightsRecordError, match=r"missing \['flavor'\]"):
        StageWeights.read(tmp_path / "final")
    done.write_text(json.dumps({**json.loads(done.read_text()), "flavor": "debug", "schema_version": 9}))
    with pytest.raises(WeightsRecordError, match="schema version 9"):
        StageWeights.read(tmp_path / "final")


def test_a_recipe_with_the_old_fault_settings_is_refused(tmp_path: Path) -> None:
    """Fault drills are armed through common.faults, never by a job's config: ``fault.*`` is an unknown key."""
    with pytest.raises(ConfigError, match="fault"):
        _cfg(tmp_path, "fault.kill_at_step=3")


def test_hashes_are_those_earlier_versions_recorded(tmp_path: Path) -> None:
    """The hashes records hold (now from common.io) are the ones earlier versions wrote, pinned: stage folders
    trained before must not look changed to a rerun."""
    inputs = {"b": 1, "a": [Path("/p"), 2.5], "c": {"z": None, "y": "é"}}
    assert json_sha256(inputs) == "3f527622bd2fee8792309bbe6cf25bb551652a4e736323fe15b7c5eb35ff3b39"
    (tmp_path / "vq" / "sub").mkdir(parents=True)
    (tmp_path / "vq" / "config.json").write_text("{}")
    (tmp_path / "vq" / "sub" / "w.bin").write_bytes(b"\x00\x01" * 100)
    assert folder_sha256(tmp_path / "vq") == "098f845757e2ee5394c52ce6cf499aec2115fcbd6ec1dbe6a1c1665801b0161a"
