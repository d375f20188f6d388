"""Curation job: sources in, curated webdataset shards + manifests + rejects ledger out.

    python -m pipelines.curate --config configs/data/curate_toyworld.yaml [dotted.key=value ...]

Runs on a local Ray instance, or on a cluster when ``RAY_ADDRESS`` is set or under ``ray job submit``.
The work (a Ray session, the Ray Data DAG: list units, process, dedup, plan, write, finish, and the MLflow run
"curate") is data_prep.curation.curate; this module is the config, ``run(cfg)`` and ``main(argv)``.
Per source: ``{out_dir}/{source}/`` with its shards and ``manifest.json`` (data_prep.manifests.CuratedManifest).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common.config import parse_job_args
from data_prep.curation import CurateConfig, CurateResult, curate
from data_prep.report import summary_table

CONFIG = CurateConfig
"""The job's config schema (pipelines.__main__ and the recipe tests look for it)."""


def run(cfg: CurateConfig) -> CurateResult:
    """Curate every source and record the run (data_prep.curation.curate)."""
    return curate(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(CurateConfig, argv, "python -m pipelines.curate", __doc__ or "")
    result = run(cfg)
    print(summary_table(result.sources, result.wall_s), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
