"""Three-stage training with Ray Train + FSDP2: ``python -m pipelines.train --config configs/train/X.yaml``.

The same command works locally (a local Ray instance, CPU workers, gloo), against a cluster (RAY_ADDRESS),
and through ``ray job submit --working-dir . -- python -m pipelines.train ...``. Each stage is one Ray Train
run named ``{name}-stage_{S}`` under ``checkpoint.dir``: running the command again with the same name
resumes the unfinished stage from its last checkpoint and skips finished ones (training.stages).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import parse_job_args
from training.config import TrainConfig
from training.stages import run_training

log = logging.getLogger("pipelines.train")

CONFIG = TrainConfig


def run(cfg: TrainConfig) -> dict[str, Path]:
    """Train the recipe's stages; each stage's final weights folder."""
    return run_training(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(TrainConfig, argv, prog="python -m pipelines.train", doc=__doc__ or "")
    finals = run(cfg)
    for stage, path in finals.items():
        log.info("stage %s weights -> %s", stage, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
