"""A training stage's final weights folder: what the next stage starts from and what inference loads.

    {stage folder}/final/model.safetensors   the model's full state dict (its own parameter names)
    {stage folder}/final/stage_done.json     :class:`StageWeights` (schema version, stage, steps, family, flavor)

Written by the training job (rank 0, atomically: a folder is complete or absent), read by the next stage,
``model.inference`` and the evaluate / generate jobs. One definition, used on both sides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from common.io import atomic_path

WEIGHTS_FILE = "model.safetensors"
DONE_FILE = "stage_done.json"
INPUTS_FILE = "inputs.json"
"""A stage folder's record of what it was trained from (written by ``training.records``, read beside final/)."""
SCHEMA_VERSION = 1


class WeightsRecordError(ValueError):
    """A stage_done.json that is not a record this code can read."""


@dataclass(frozen=True)
class StageWeights:
    """The record beside a stage's final weights."""

    stage: str
    """I, II or III."""
    steps: int
    """Optimizer steps the stage took."""
    family: str
    """janus_pro or janusflow."""
    flavor: str
    """Key of model.flavors.FLAVORS the weights were built with."""
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / DONE_FILE).is_file()

    @classmethod
    def read(cls, folder: str | Path) -> StageWeights:
        path = Path(folder) / DONE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WeightsRecordError(f"{path}: unreadable stage weights record ({exc})") from exc
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise WeightsRecordError(f"{path}: not a JSON object")
        version = data.get("schema_version", SCHEMA_VERSION)  # records before versioning held the same fields
        if version != SCHEMA_VERSION:
            raise WeightsRecordError(f"{path}: schema version {version!r}, this code reads {SCHEMA_VERSION}")
        missing = sorted(names - {"schema_version"} - set(data))
        if missing:
            raise WeightsRecordError(f"{path}: missing {missing}")
        return cls(**{k: data[k] for k in names if k in data})

    def write(self, folder: str | Path, weights: dict[str, torch.Tensor]) -> Path:
        """The weights and this record into ``folder``, replacing it whole (a temporary folder renamed)."""
        from safetensors.torch import save_file

        out = Path(folder)
        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_file(weights, str(tmp / WEIGHTS_FILE))
            (tmp / DONE_FILE).write_text(json.dumps(asdict(self), indent=1))
        return out


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a stage's final folder."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / WEIGHTS_FILE))
