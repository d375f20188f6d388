"""The stage inputs record: what a stage's weights depend on, written into its folder before it trains.

    {stage folder}/inputs.json    :class:`StageInputs` (schema version, sha256 of the inputs, the inputs)

A rerun compares its own record with the folder's: equal, the stage may be skipped or resumed; different,
it stops and names what changed (a changed recipe, re-mixed shards, a refitted tokenizer) instead of reusing
stale weights. The next stage chains its predecessor's hash into its own inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import to_dict
from common.io import atomic_write_json, file_sha256, folder_sha256, json_sha256
from model.weights import INPUTS_FILE
from training.config import TrainConfig

log = logging.getLogger("training.records")

SCHEMA_VERSION = 1


class StageInputsChanged(ValueError):
    """A stage folder holds work done from other inputs than the ones asked for now (or an unreadable record)."""


def _differences(old: object, new: object, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


@dataclass(frozen=True)
class StageInputs:
    """What a stage's weights depend on (see :meth:`of`), and its hash."""

    sha256: str
    inputs: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def of(cls, cfg: TrainConfig, stage: str, init: Path | None, tars: Sequence[Path]) -> StageInputs:
        """Its stage, model and optimizer settings, the seed, where it starts (the previous stage's record,
        chained), its shards (names, sizes, the stage manifest's hash) and the contents of the fitted tokenizer
        it trains against. Not in it: logging, checkpoint cadence, parallelism and scaling (a stage may resume
        on other hardware)."""
        manifest = tars[0].parent / "manifest.json"
        start: dict = {"model.path": cfg.model.path, "stage_init": cfg.stage_init}
        if init is not None:
            previous = Path(init).parent
            start["previous_stage"] = (
                cls.read(previous).sha256 if (previous / INPUTS_FILE).is_file() else str(Path(init).resolve())
            )
        tokenizers = {
            key: folder_sha256(Path(value))
            for key, value in (
                ("vq_path", cfg.model.vq_path),
                ("vae_path", cfg.model.vae_path),
                ("vision_path", cfg.model.vision_path),
            )
            if value
        }
        stage_settings = to_dict(cfg.stage[stage])
        if not stage_settings.get("also_train"):  # the paper's schedule hashes as before the option existed
            stage_settings.pop("also_train", None)
        model = to_dict(cfg.model)
        if model.get("vision_path") is None:  # runs without a pre-fitted tower hash as before the option
            model.pop("vision_path", None)
        inputs = {
            "stage": stage_settings,
            "tokenizers": tokenizers,
            "model": model,
            "optim": to_dict(cfg.optim),
            "seed": cfg.seed,
            "ema_decay": cfg.ema_decay,
            "start": start,
            "shards": {
                "files": [[t.name, t.stat().st_size] for t in tars],
                "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            },
        }
        return cls(json_sha256(inputs), inputs)

    @classmethod
    def read(cls, folder: Path) -> StageInputs:
        path = Path(folder) / INPUTS_FILE
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
                raise ValueError("no sha256 field")
            version = data.get("schema_version", SCHEMA_VERSION)  # records before versioning: the same fields
            if version != SCHEMA_VERSION:
                raise ValueError(f"schema version {version!r}, this code reads {SCHEMA_VERSION}")
            if not isinstance(data.get("inputs"), dict):
                raise ValueError("no inputs field")
        except (OSError, ValueError) as exc:
            raise StageInputsChanged(
                f"{path}: unreadable stage record ({exc}); delete its stage folder to train that stage anew"
            ) from exc
        return cls(data["sha256"], data["inputs"], version)

    def write(self, folder: Path) -> None:
        """Atomically (a temporary file renamed)."""
        record = {"schema_version": self.schema_version, "sha256": self.sha256, "inputs": self.inputs}
        atomic_write_json(Path(folder) / INPUTS_FILE, record, indent=1)

    def differences(self, other: StageInputs) -> list[str]:
        """The dotted keys whose values differ (e.g. ``stage.lr``, ``shards.manifest_sha256``)."""
        return _differences(self.inputs, other.inputs)


def check_stage_inputs(folder: Path, current: StageInputs, stage: str) -> None:
    """Refuse to skip or resume a stage whose folder was trained from other inputs; record them otherwise.

    A folder from before the record existed (work in it but no record) is trusted, with a warning."""
    if (folder / INPUTS_FILE).is_file():
        recorded = StageInputs.read(folder)
        if recorded.sha256 == current.sha256:
            return
        changed = recorded.differences(current) or ["(unreadable record)"]
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StageInputsChanged(
            f"stage {stage}: {folder} holds training from other inputs than this run's (changed: {shown}); "
            f"delete that folder (and the later stages') to train anew, or give another name= or checkpoint.dir="
        )
    if folder.is_dir() and any(folder.iterdir()):
        log.warning("%s has no %s; trusting its work was done from this recipe", folder, INPUTS_FILE)
        return
    current.write(folder)
