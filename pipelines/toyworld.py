"""Write the toy-world sources: ``python -m pipelines.toyworld --config configs/data/toyworld.yaml``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import parse_job_args, save_resolved
from data_prep.toyworld import ToyWorldConfig, build_toyworld

log = logging.getLogger("pipelines.toyworld")

CONFIG = ToyWorldConfig


def run(cfg: ToyWorldConfig) -> Path:
    """Draw the toy world and save its resolved config beside it; its root folder."""
    out = build_toyworld(cfg)
    save_resolved(cfg, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(ToyWorldConfig, argv, prog="python -m pipelines.toyworld", doc=__doc__ or "")
    start = time.perf_counter()
    out = run(cfg)
    log.info("wrote %s in %.1fs (summary: %s)", out, time.perf_counter() - start, out / "toyworld.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
