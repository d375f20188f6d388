"""Curation job: sources in, curated webdataset shards + manifests + rejects ledger out.

    python -m pipelines.curate --config configs/data/curate_toyworld.yaml [dotted.key=value ...]

Runs on a local Ray instance, or on a cluster when ``RAY_ADDRESS`` is set or under ``ray job submit``.
What it computes (the Ray Data DAG: list units, process, dedup, plan, write, finish) is data_prep.curation;
this module is the config, ``run(cfg)`` (Ray session, the DAG, the MLflow run "curate") and ``main(argv)``.
Per source: ``{out_dir}/{source}/`` with its shards and ``manifest.json`` (data_prep.manifests.CuratedManifest).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import parse_job_args, save_resolved, to_flat_dict
from common.lineage import curated_dataset, source_dataset
from common.ray_session import ray_session
from common.tracking import build_tracker
from data_prep.curation import (  # noqa: F401 - the job's names (tests, benchmarks) stay importable from here
    LOG_DIR,
    WORK_DIR,
    AccountingError,
    CurateConfig,
    ExecConfig,
    configure_ray_data,
    content_config_hash,
    finish_source,
    run_curation,
)
from data_prep.manifests import MANIFEST_NAME
from data_prep.report import grid_image, source_metrics, summary_table

CONFIG = CurateConfig
"""The job's config schema (pipelines.__main__ and the recipe tests look for it)."""


@dataclass(frozen=True)
class CurateResult:
    """What a curation run hands the next job: where each source's curated folder and manifest are."""

    out_dir: Path
    """The output root (absolute)."""
    manifests: dict[str, Path]
    """Source name -> its manifest.json (data_prep.manifests.CuratedManifest), in config order."""
    sources: list[dict[str, Any]]
    """Per source: its manifest's fields, worker seconds and input files (what the summary table reads)."""
    wall_s: float
    """Seconds of the DAG, after Ray start-up."""

    @property
    def kept(self) -> dict[str, int]:
        return {r["source"]: r["kept"] for r in self.sources}


def log_run(cfg: CurateConfig, results: list[dict[str, Any]], wall_s: float, resolved: Path | None = None) -> None:
    """MLflow run "curate": parameters, counts per reason, throughput, grids, manifests, rejects summary, and
    the lineage: each source read, each curated source written."""
    tracker = build_tracker(cfg.tracking, "curate", jsonl_path=Path(cfg.out_dir) / LOG_DIR / "curate.jsonl")
    with tracker:
        tracker.log_params(to_flat_dict(cfg))
        specs = {src.name: dataclasses.asdict(src) for src in cfg.sources}
        files = {r["source"]: r.get("input_files", []) for r in results}
        tracker.log_datasets([source_dataset(n, specs[n], files.get(n, [])) for n in specs], "source")
        manifests = [Path(cfg.out_dir) / r["source"] / MANIFEST_NAME for r in results]
        tracker.log_datasets([curated_dataset(m) for m in manifests], "output")
        if resolved is not None:
            tracker.log_artifact(resolved)
        tracker.log_metrics(source_metrics(results, wall_s))
        for r in results:
            folder = Path(cfg.out_dir) / r["source"]
            tracker.log_artifact(folder / MANIFEST_NAME, f"manifests/{r['source']}")
            grid = grid_image([folder / s["name"] for s in r["shards"]], cfg.seed)
            if grid is not None:
                tracker.log_image(grid, f"grids/{r['source']}.png")
        tracker.log_dict({r["source"]: r["rejects_by_reason"] for r in results}, "rejects_summary.json")


def run(cfg: CurateConfig) -> CurateResult:
    """Curate every source (joining the running Ray or starting a local one), record the run; the result
    says where the curated sources are."""
    resolved = save_resolved(cfg, Path(cfg.out_dir) / LOG_DIR)
    with ray_session(cfg.exec.num_cpus):
        start = time.perf_counter()  # after Ray start-up: a cluster is already up
        results = run_curation(cfg)
        wall = time.perf_counter() - start
    log_run(cfg, results, wall, resolved)
    out = Path(cfg.out_dir).absolute()
    return CurateResult(out, {r["source"]: out / r["source"] / MANIFEST_NAME for r in results}, results, wall)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(CurateConfig, argv, "python -m pipelines.curate", __doc__ or "")
    result = run(cfg)
    print(summary_table(result.sources, result.wall_s), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
