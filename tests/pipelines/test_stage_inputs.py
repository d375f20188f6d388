"""A finished or half-trained stage is reused only when it was trained from the inputs asked for now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.train import INPUTS_FILE, StageInputsChanged, check_stage_inputs, stage_inputs
from pipelines.train_config import TrainConfig

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "train" / "debug_janusflow.yaml"


def _shards(folder: Path, manifest: str = '{"count": 4}') -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.tar", "b.tar"):
        (folder / name).write_bytes(b"x" * 1024)
    (folder / "manifest.json").write_text(manifest)
    return sorted(folder.glob("*.tar"))


def _cfg(tmp_path: Path, *overrides: str) -> TrainConfig:
    vae = tmp_path / "vae"
    vae.mkdir(exist_ok=True)
    if not (vae / "config.json").exists():
        (vae / "config.json").write_text("{}")
    return load_config(TrainConfig, RECIPE, ["tracking.backend=none", f"model.vae_path={vae}", *overrides])


def test_same_inputs_are_reused_and_recorded_once(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    check_stage_inputs(folder, stage_inputs(_cfg(tmp_path), "I", None, tars), "I")
    recorded = (folder / INPUTS_FILE).read_text()
    (folder / "final").mkdir()  # work done in the folder
    check_stage_inputs(folder, stage_inputs(_cfg(tmp_path), "I", None, tars), "I")
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
    check_stage_inputs(folder, stage_inputs(_cfg(tmp_path), "I", None, tars), "I")
    overrides = {"recipe": ["stage.I.lr=5e-3"], "loss": ["model.janusflow.t_mu=0.0"]}.get(change, [])
    if change == "shards":
        tars = _shards(tmp_path / "shards", '{"count": 5}')
    if change == "vae":
        (tmp_path / "vae" / "config.json").write_text('{"refit": 1}')
    with pytest.raises(StageInputsChanged, match=named.replace(".", r"\.")) as err:
        check_stage_inputs(folder, stage_inputs(_cfg(tmp_path, *overrides), "I", None, tars), "I")
    assert str(folder) in str(err.value) and "delete" in str(err.value)


def test_a_retrained_previous_stage_invalidates_the_next(tmp_path: Path) -> None:
    tars, root = _shards(tmp_path / "shards"), tmp_path / "ckpt"
    cfg = _cfg(tmp_path)
    check_stage_inputs(root / "I", stage_inputs(cfg, "I", None, tars), "I")
    (root / "I" / "final").mkdir()
    check_stage_inputs(root / "II", stage_inputs(cfg, "II", root / "I" / "final", tars), "II")
    # stage I retrained from another recipe: its record changes, so stage II's start does too
    (root / "I" / INPUTS_FILE).unlink()
    check_stage_inputs(root / "I.new", stage_inputs(_cfg(tmp_path, "stage.I.lr=5e-3"), "I", None, tars), "I")
    (root / "I" / INPUTS_FILE).write_text((root / "I.new" / INPUTS_FILE).read_text())
    with pytest.raises(StageInputsChanged, match=r"start\.previous_stage"):
        check_stage_inputs(root / "II", stage_inputs(cfg, "II", root / "I" / "final", tars), "II")


def test_a_folder_from_before_the_record_is_trusted(tmp_path: Path, capsys) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    (folder / "final").mkdir(parents=True)
    check_stage_inputs(folder, stage_inputs(_cfg(tmp_path), "I", None, tars), "I")
    assert "no inputs.json" in capsys.readouterr().out
    assert not (folder / INPUTS_FILE).exists()


def test_an_unreadable_record_is_named(tmp_path: Path) -> None:
    tars, folder = _shards(tmp_path / "shards"), tmp_path / "ckpt" / "stage_I"
    folder.mkdir(parents=True)
    (folder / INPUTS_FILE).write_text("{not json")
    with pytest.raises(StageInputsChanged, match="unreadable stage record"):
        check_stage_inputs(folder, stage_inputs(_cfg(tmp_path), "I", None, tars), "I")
