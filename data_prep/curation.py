"""Curation: sources in, curated webdataset shards + manifests + rejects ledger out (the job: pipelines.curate).

``run_curation(cfg)`` runs on the Ray instance this process is connected to; it knows nothing of argv or of
how Ray was started. ``curate(cfg)`` is the whole job (a Ray session, the DAG, the MLflow run "curate"), what
pipelines.curate runs and the demo chains. The DAG, each step a Ray Data stage or a small driver step:

1. list units (driver): each source cut into units (line ranges, row groups, folder chunks, tar shards);
2. process units (Ray Data ``map_batches``, one unit per call): read -> validate -> filter -> decode/convert
   -> hash/pHash -> normalise, staged per unit under ``{out}/_work`` (atomic files: a rerun skips units
   already staged). With model scorers or caption languages, a chain of stages instead (data_prep.score_stages):
   prepare (tasks) -> languages -> one actor pool per scorer group (CPU or fractional GPUs) -> finish (tasks);
3. dedup (Ray Data groupings, data_prep.dedup_stages): exact, near and text duplicates across all sources,
   then semantic duplicates among the images kept (data_prep.semdedup: k-means on CLIP embeddings, clusters
   resolved in parallel), then per unit its kept samples and its rejects (data_prep.curated_plan);
4. plan (a Ray task per source): where each shard starts, streamed over the kept files; the rejects ledger;
5. write (Ray Data ``map_batches``, one shard per call): contiguous, deterministic shards through
   data_prep.shards.TarShardWriter, then a .parquet and a _stats.json (last) beside each tar; a shard whose
   stats match is reused;
6. finish (driver): the accounting check inputs = kept + rejected, then manifest.json
   (data_prep.manifests.CuratedManifest). The job prints the summary table and records the MLflow run "curate".

The driver holds per-unit and per-shard summaries only, never a row per sample: its memory does not grow
with the corpus (benchmarks/curate_scale.py, benchmarks/curate_memory.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from common import faults
from common.config import config_hash, save_resolved, to_flat_dict
from common.lineage import curated_dataset, source_dataset
from common.ray_session import ray_session
from common.tracking import TrackingConfig, build_tracker
from data_prep.captions import check_languages
from data_prep.curated_plan import decide_units, plan_path, plan_sources, shard_members
from data_prep.curated_shards import ShardConfig, remove_stale, write_shard
from data_prep.dedup import DedupConfig
from data_prep.imaging import ImageConfig
from data_prep.manifests import MANIFEST_NAME, CuratedManifest, CuratedShard
from data_prep.model_scorers import check_scorers
from data_prep.process import process_unit, staging_path
from data_prep.report import grid_image, source_metrics
from data_prep.schema import SCHEMA_VERSION
from data_prep.score_stages import finish_unit, prepare_unit, scoring_chain
from data_prep.scorers import ScorerConfig, validate_scorer_set
from data_prep.semdedup import EmbeddingsConfig
from data_prep.sources import SourceConfig, Unit, list_units

WORK_DIR = "_work"
LOG_DIR = "_logs"
DRILL_UNIT = "curate.unit"
"""Fault-drill point (common.faults) at the start of each unit's processing task; context ``unit``: the job-wide
unit number (units of all sources in config order)."""
SHUFFLES = ("sort_shuffle_pull_based", "sort_shuffle_push_based", "hash_shuffle", "shuffle_v2")


@dataclass(kw_only=True)
class ExecConfig:
    num_cpus: int = 0
    """CPUs of a local Ray instance started by the job (0: all cores); ignored when joining a cluster."""
    scorer_actors: int = 1
    """Actors of each scorer stage (and of the caption-language stage) unless a scorer sets its own."""
    keep_work: bool = False
    """Keep the staging folder {out}/_work after a successful run (it is what makes a rerun resume)."""
    progress: bool = True
    """Show Ray Data progress bars."""
    dedup_rows_per_task: int = 200_000
    """Rows one dedup task handles (partitions = rows / this): a task's memory stays flat as the corpus grows."""
    shuffle: str = "sort_shuffle_pull_based"
    """Ray Data shuffle strategy of the dedup groupings: sort_shuffle_pull_based (tasks; least overhead),
    sort_shuffle_push_based (thousands of partitions), hash_shuffle or shuffle_v2 (aggregator actors)."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.scorer_actors < 1:
            raise ValueError("exec.num_cpus must be >= 0 and exec.scorer_actors >= 1")
        if self.dedup_rows_per_task < 1:
            raise ValueError(f"exec.dedup_rows_per_task must be >= 1, got {self.dedup_rows_per_task}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"exec.shuffle {self.shuffle!r} is not one of {SHUFFLES}")


@dataclass(kw_only=True)
class CurateConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The sources to curate: [{name, kind, format, path, ...field mapping, filters}]."""
    out_dir: str = "outputs/curated"
    """Output root: one folder per source."""
    seed: int = 0
    """Seed of every choice that is not fixed by the data (the report's sample grid)."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Decoding cap and normalisation (resize, re-encode)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Global exact and near-duplicate removal across all sources."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Samples and bytes per shard."""
    scorers: list[ScorerConfig] = field(default_factory=list)
    """Model-based scorers run on every image candidate (thresholds: each source's filters)."""
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    """Which clip scorer's image embeddings are kept (semantic dedup) and whether they are written out."""
    exec: ExecConfig = field(default_factory=ExecConfig)
    """Where and how it runs (not part of the output's identity)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow / JSONL tracking."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources is empty: give at least one {name, kind, format, path}")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: duplicate names {dupes}")
        if any(n.startswith("_") for n in names):
            raise ValueError("sources.name must not start with '_' (reserved for _work and _logs)")
        validate_scorer_set(self.scorers)
        clips = [s.name for s in self.scorers if s.model == "clip"]
        if self.embeddings.scorer and self.embeddings.scorer not in clips:
            raise ValueError(f"embeddings.scorer {self.embeddings.scorer!r} is not a clip scorer of {clips}")
        if (self.dedup.semantic.enabled or self.embeddings.write) and not self.embeddings.scorer:
            raise ValueError("dedup.semantic.enabled and embeddings.write need embeddings.scorer (a clip scorer)")


class AccountingError(RuntimeError):
    """A source whose inputs do not equal kept + rejected."""


def content_config_hash(cfg: CurateConfig) -> str:
    """Hash of everything that decides the output bytes: common.config.config_hash of the config with what
    does not (out_dir, exec, tracking) set to fixed values. Every job's content hash is made this way
    (data_prep.mixing.content_hash too)."""
    return config_hash(dataclasses.replace(cfg, out_dir="", exec=ExecConfig(), tracking=TrackingConfig()))


def prepare_work_dir(cfg: CurateConfig) -> Path:
    """The staging folder, emptied when it was made under a different config (so staging is never stale)."""
    work = Path(cfg.out_dir) / WORK_DIR
    stamp = work / "config_hash"
    want = content_config_hash(cfg)
    if work.exists() and (not stamp.exists() or stamp.read_text().strip() != want):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(want + "\n")
    return work


def _unit_context(cfg: CurateConfig, work: Path) -> dict[str, Any]:
    return {
        "sources": {s.name: s for s in cfg.sources},
        "image": cfg.image,
        "work": str(work),
    }


def drill_env() -> dict[str, Any]:
    """The Ray Data map arguments that carry armed fault drills (common.faults) to the tasks, also when this job
    joined a Ray started before they were armed; none when no drill is armed (production)."""
    env = faults.env_vars()
    return {"runtime_env": {"env_vars": env}} if env else {}


def run_units_batch(batch: dict[str, np.ndarray], ctx: dict[str, Any]) -> dict[str, list]:
    """Ray Data task: process and stage the units of a batch (no scorers)."""
    out: dict[str, list] = {"summary": []}
    for text, job_unit in zip(batch["unit"], batch["job_unit"], strict=True):
        faults.point(DRILL_UNIT, unit=int(job_unit))
        unit = Unit.from_json(str(text))
        summary = process_unit(unit, ctx["sources"][unit.source], ctx["image"], ctx["work"])
        out["summary"].append(json.dumps(summary, sort_keys=True))
    return out


def prepare_units_batch(batch: dict[str, np.ndarray], ctx: dict[str, Any]) -> dict[str, list]:
    """Ray Data task: the first stage of the scoring chain (read and prepare whole units)."""
    out: dict[str, list] = {"unit": [], "job_unit": [], "payload": [], "summary": []}
    for text, job_unit in zip(batch["unit"], batch["job_unit"], strict=True):
        faults.point(DRILL_UNIT, unit=int(job_unit))
        unit = Unit.from_json(str(text))
        payload, summary = prepare_unit(unit, ctx["sources"][unit.source], ctx["image"])
        out["unit"].append(str(text))
        out["job_unit"].append(int(job_unit))
        out["payload"].append(payload)
        out["summary"].append(json.dumps(summary, sort_keys=True))
    return out


def finish_units_batch(batch: dict[str, np.ndarray], ctx: dict[str, Any]) -> dict[str, list]:
    """Ray Data task: the last stage of the scoring chain (thresholds, encoding, staging files)."""
    out: dict[str, list] = {"summary": []}
    for text, payload, summary in zip(batch["unit"], batch["payload"], batch["summary"], strict=True):
        unit = Unit.from_json(str(text))
        done = finish_unit(unit, ctx["sources"][unit.source], payload, str(summary), ctx["work"])
        out["summary"].append(json.dumps(done, sort_keys=True))
    return out


def configure_ray_data(progress: bool, shuffle: str = "sort_shuffle_pull_based") -> None:
    """Progress bars on request; no per-operator resource reservation: our plans are one map each, and the
    reservation would hold back half the CPUs of a small machine (1 task at a time on 2 cores). ``shuffle``:
    the strategy of the dedup groupings (ExecConfig.shuffle)."""
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.op_resource_reservation_enabled = False
    ctx.shuffle_strategy = ShuffleStrategy(shuffle)


def process_all_units(cfg: CurateConfig, units: list[Unit], work: Path) -> list[dict[str, Any]]:
    """Stage every unit not staged yet (Ray Data); return the summaries of all units."""
    import ray

    ctx = _unit_context(cfg, work)
    pending = [
        {"unit": u.to_json(), "job_unit": job_unit}
        for job_unit, u in enumerate(units)
        if not staging_path(str(work), u.source, u.index).exists()
    ]
    if pending:
        configure_ray_data(cfg.exec.progress, cfg.exec.shuffle)
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        languages = any(s.filters.languages for s in cfg.sources)
        drills = drill_env()
        if cfg.scorers or languages:
            ds = ds.map_batches(prepare_units_batch, batch_size=1, fn_kwargs={"ctx": ctx}, num_cpus=1, **drills)
            ds = scoring_chain(ds, cfg.scorers, cfg.embeddings.scorer, ctx["sources"], cfg.exec.scorer_actors)
            ds = ds.map_batches(finish_units_batch, batch_size=1, fn_kwargs={"ctx": ctx}, num_cpus=1, **drills)
        else:
            ds = ds.map_batches(run_units_batch, batch_size=1, fn_kwargs={"ctx": ctx}, num_cpus=1, **drills)
        ds.take_all()
    return [_unit_summary(work, u) for u in units]


def _unit_summary(work: Path, unit: Unit) -> dict[str, Any]:
    meta = pq.read_metadata(staging_path(str(work), unit.source, unit.index)).metadata or {}
    return json.loads(meta[b"janus.unit"])


def write_shards_batch(
    batch: dict[str, np.ndarray], work: str, out: str, config_hash: str, first: dict[str, int], embeddings: bool
) -> dict[str, list]:
    """Ray Data task: write the shards of a batch of shard-plan rows (data_prep.curated_plan.write_shard_plan)."""
    stats = []
    for source, index, ranges in zip(batch["source"], batch["index"], batch["ranges"], strict=True):
        source, index = str(source), int(index)
        members, digest = shard_members(work, source, json.loads(str(ranges)))
        spec = {
            "source": source,
            "index": index,
            "members": members,
            "keys_digest": digest,
            "config_hash": config_hash,
            "job_shard": first[source] + index,
            "embeddings": embeddings,
        }
        stats.append(json.dumps(write_shard(spec, work, out)))
    return {"stats": stats}


def write_all_shards(
    cfg: CurateConfig, plans: dict[str, dict[str, Any]], work: Path, config_digest: str
) -> list[dict[str, Any]]:
    """Every planned shard, one Ray task each, from the plan files; returns their stats (per-shard summaries)."""
    import ray

    first: dict[str, int] = {}  # each source's first job-wide shard number: shards count over all sources in
    total = 0  # config order (what the "curate.shard" drill point reports)
    for src in cfg.sources:
        first[src.name] = total
        total += plans[src.name]["shards"]
    if total == 0:
        return []
    paths = [str(plan_path(str(work), s.name)) for s in cfg.sources if plans[s.name]["shards"]]
    ds = ray.data.read_parquet(paths).repartition(total)
    kwargs = {
        "work": str(work),
        "out": cfg.out_dir,
        "config_hash": config_digest,
        "first": first,
        "embeddings": cfg.embeddings.write,
    }
    stats = [
        json.loads(r["stats"])
        for r in ds.map_batches(
            write_shards_batch, batch_size=1, num_cpus=1, fn_kwargs=kwargs, **drill_env()
        ).take_all()
    ]
    return sorted(stats, key=lambda s: (s["source"], s["shard"]))


def finish_source(
    cfg: CurateConfig,
    src: SourceConfig,
    units: list[dict],
    stats: list[dict],
    by_reason: dict[str, int],
    config_digest: str,
) -> dict[str, Any]:
    """Stale-file cleanup, accounting check, then manifest.json (written last). ``units``: the source's unit
    summaries; ``stats``: its shards' stats; ``by_reason``: its rejects ledger's counts."""
    folder = Path(cfg.out_dir) / src.name
    remove_stale(folder, src.name, len(stats))
    inputs = sum(u["inputs"] for u in units)
    kept = sum(s["samples"] for s in stats)
    rejected = sum(by_reason.values())
    if inputs != kept + rejected:
        raise AccountingError(f"source {src.name}: inputs {inputs} != kept {kept} + rejected {rejected}")
    ignored: dict[str, int] = {}
    for u in units:
        for ext, n in u["ignored_members"].items():
            ignored[ext] = ignored.get(ext, 0) + n
    manifest = CuratedManifest(
        source=src.name,
        kind=src.kind,
        task=src.task,
        format=src.format,
        path=src.path,
        schema_version=SCHEMA_VERSION,
        inputs=inputs,
        kept=kept,
        rejected=rejected,
        rejects_by_reason=dict(sorted(by_reason.items())),
        bytes=sum(s["bytes"] for s in stats),
        shards=[
            CuratedShard(name=s["shard"], samples=s["samples"], bytes=s["bytes"], sha256=s["sha256"]) for s in stats
        ],
        config_hash=config_digest,
        ignored_members=dict(sorted(ignored.items())),
    )
    manifest.write(folder / MANIFEST_NAME)
    seconds = sum(u["seconds"] for u in units)
    return {**manifest.to_dict(), "seconds": seconds}


def invalidate_manifests(cfg: CurateConfig) -> None:
    """A manifest says its folder is complete; from the moment this run may replace shards until it writes
    its own, no manifest of an earlier run may vouch for the folder (a failed rerun leaves none, not a stale one)."""
    for src in cfg.sources:
        (Path(cfg.out_dir) / src.name / MANIFEST_NAME).unlink(missing_ok=True)


def run_curation(cfg: CurateConfig) -> list[dict[str, Any]]:
    """The whole DAG on the Ray instance this process is connected to. Returns one result per source."""
    config_digest = content_config_hash(cfg)
    # tasks run in their node's working directory, not the driver's: hand them no relative path
    cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir))
    check_models(cfg)
    invalidate_manifests(cfg)
    work = prepare_work_dir(cfg)
    units = [u for src in cfg.sources for u in list_units(src)]
    summaries = process_all_units(cfg, units, work)
    configure_ray_data(cfg.exec.progress, cfg.exec.shuffle)
    unit_refs = [(u.source, u.index) for u in units]
    joins = {s.name: s.dedup for s in cfg.sources}
    decided = decide_units(unit_refs, joins, str(work), cfg.dedup, cfg.exec.dedup_rows_per_task)
    plans = plan_sources(unit_refs, [s.name for s in cfg.sources], str(work), cfg.out_dir, cfg.shards)
    for src in cfg.sources:  # the plan read back every kept file the decisions wrote
        decided_kept = sum(d["kept"] for d in decided if d["source"] == src.name)
        if decided_kept != plans[src.name]["kept"]:
            raise AccountingError(
                f"source {src.name}: {decided_kept} kept after dedup, {plans[src.name]['kept']} planned"
            )
    stats = write_all_shards(cfg, plans, work, config_digest)
    results = []
    for src in cfg.sources:
        src_units = [s for s in summaries if s["source"] == src.name]
        src_stats = [s for s in stats if s["source"] == src.name]
        by_reason = plans[src.name]["rejects_by_reason"]
        result = finish_source(cfg, src, src_units, src_stats, by_reason, config_digest)
        result["input_files"] = input_files([u for u in units if u.source == src.name])
        results.append(result)
    if not cfg.exec.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return results


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


def curate(cfg: CurateConfig) -> CurateResult:
    """The job: curate every source (joining the running Ray or starting a local one with exec.num_cpus),
    record the MLflow run "curate"; the result says where the curated sources are."""
    resolved = save_resolved(cfg, Path(cfg.out_dir) / LOG_DIR)
    with ray_session(cfg.exec.num_cpus):
        start = time.perf_counter()  # after Ray start-up: a cluster is already up
        results = run_curation(cfg)
        wall = time.perf_counter() - start
    log_run(cfg, results, wall, resolved)
    out = Path(cfg.out_dir).absolute()
    return CurateResult(out, {r["source"]: out / r["source"] / MANIFEST_NAME for r in results}, results, wall)


def check_models(cfg: CurateConfig) -> None:
    """Job start, before any work: every scorer's weights exist and fit their architecture, every language
    is one the identifier knows (errors name the scorer or source and the path)."""
    check_scorers(cfg.scorers)
    for src in cfg.sources:
        try:
            check_languages(src.filters)
        except ValueError as exc:
            raise ValueError(f"sources[{src.name}]: {exc}") from None


def input_files(units: list[Unit]) -> list[tuple[str, int]]:
    """The files a source's units read, with their sizes (0 where not local): what its dataset digest covers."""
    files = sorted({u.path for u in units})
    return [(f, os.path.getsize(f) if "://" not in f and os.path.isfile(f) else 0) for f in files]
