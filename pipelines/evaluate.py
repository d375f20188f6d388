"""Evaluate a checkpoint on the toy world: ``python -m pipelines.evaluate --config configs/eval_toy.yaml``.

Held-out understanding questions and judged generations (``evaluation.toy_eval``); writes
``{out_dir}/eval.json`` and the sample grids, logs them to the MLflow child run ``evaluate`` and prints the
accuracy table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.config import parse_job_args
from evaluation.toy_eval import EvalConfig, EvalReport, run_evaluation

CONFIG = EvalConfig


def run(cfg: EvalConfig) -> EvalReport:
    """Evaluate the checkpoint and record the run; the report."""
    return run_evaluation(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(EvalConfig, argv, prog="python -m pipelines.evaluate", doc=__doc__ or "")
    print(run(cfg).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
