"""The config system: defaults <- YAML <- overrides, strict, errors that name the key and the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    config_hash,
    load_config,
    parse_job_args,
    save_resolved,
    to_flat_dict,
)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class JobConfig:
    name: str = "job"
    """Job name."""
    steps: int = 10
    """Steps."""
    stages: list[str] = field(default_factory=lambda: ["I", "II", "III"])
    """Stages to run."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""


def _yaml(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "r.yaml", "steps: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(JobConfig, path, ["optim.lr=0.5", "stages=[II,III]"])
    assert isinstance(cfg, JobConfig) and isinstance(cfg.optim, OptimConfig)
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.stages) == ("job", 20, 0.5, ["II", "III"])


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert "optim.lrr" in str(err.value) and "bad.yaml" in str(err.value)


def test_unknown_key_in_override_names_it() -> None:
    with pytest.raises(ConfigError, match=r"override 'optim\.lrr=1'.*optim\.lrr"):
        load_config(JobConfig, None, ["optim.lrr=1"])


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "typed.yaml", "steps: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert "steps" in str(err.value) and "typed.yaml" in str(err.value)


def test_post_init_validation_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(JobConfig, None, ["optim.lr=-1"])


def test_override_needs_equals_sign() -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(JobConfig, None, ["steps"])


def test_base_inheritance_and_cycle(tmp_path: Path) -> None:
    _yaml(tmp_path, "base.yaml", "steps: 5\nname: base\n")
    child = _yaml(tmp_path, "child.yaml", "_base_: base.yaml\nname: child\n")
    cfg = load_config(JobConfig, child)
    assert (cfg.steps, cfg.name) == (5, "child")
    _yaml(tmp_path, "a.yaml", "_base_: b.yaml\n")
    _yaml(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(JobConfig, tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(JobConfig, _yaml(tmp_path, "broken.yaml", "steps: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(JobConfig, _yaml(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_save_resolved_round_trips(tmp_path: Path) -> None:
    cfg = load_config(JobConfig, None, ["steps=7"])
    path = save_resolved(cfg, tmp_path / "out")
    again = load_config(JobConfig, path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg) != config_hash(load_config(JobConfig))
    assert to_flat_dict(cfg)["optim.lr"] == pytest.approx(1e-3)


def test_parse_job_args(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "r.yaml", "steps: 3\n")
    cfg = parse_job_args(JobConfig, ["--config", str(path), "name=x"], prog="t")
    assert (cfg.steps, cfg.name) == (3, "x")


def test_log_level_flag_sets_every_jobs_logging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    parse_job_args(JobConfig, ["--log-level", "WARNING", "name=quiet"], prog="t")
    logging.getLogger("training.stages").info("not shown")
    logging.getLogger("training.stages").warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err and " WARNING training.stages: shown" in err
    with pytest.raises(SystemExit):
        parse_job_args(JobConfig, ["--log-level", "LOUD"], prog="t")
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err
    parse_job_args(JobConfig, [], prog="t")  # back to the default
    assert logging.getLogger().level == logging.INFO


def test_train_recipe_also_train_is_checked_against_the_family_at_load() -> None:
    from training.config import TrainConfig

    recipe = "configs/train/debug_janus_pro.yaml"
    cfg = load_config(TrainConfig, recipe, ["stage.II.also_train=[siglip]"])
    assert cfg.stage["II"].also_train == ["siglip"]
    with pytest.raises(ConfigError, match=r"stage\.II\.also_train: janus_pro: also_train \['vq'\]"):
        load_config(TrainConfig, recipe, ["stage.II.also_train=[vq]"])
