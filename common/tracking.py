"""Experiment tracking: a small Tracker with MLflow, JSONL and no-op backends.

One parent run per pipeline invocation (:func:`pipeline_run`), one child run per job or training stage
(:func:`build_tracker`). Children find their parent through ``TrackingConfig.parent_run_id`` or the
``JANUS_PARENT_RUN_ID`` environment variable that :func:`pipeline_run` sets, so jobs started in-process,
as subprocesses or as Ray tasks nest the same way. A child given a ``run_key`` continues the run that
carries that key (a restarted training stage continues its run instead of starting a duplicate).

The embedded default store is ``sqlite:///mlflow.db`` (artifacts in ``mlartifacts/`` beside the file);
``MLFLOW_TRACKING_URI`` or ``tracking.uri`` points elsewhere (e.g. an ``mlflow server``).

Every backend records params, tags and logged dicts through :mod:`common.redact`: secret-named keys,
secret environment values and URI passwords never reach MLflow or the JSONL logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.redact import redact, redact_params, redact_text

PARENT_ENV = "JANUS_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"
RUN_KEY_TAG = "janus.run_key"
BACKENDS = ("mlflow", "jsonl", "none")
_PARAM_MAX = 6000
_METRIC_NAME_RE = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(kw_only=True)
class TrackingConfig:
    backend: str = "mlflow"
    """mlflow (rank 0, plus JSONL on every rank), jsonl (local files only) or none."""
    uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir."""
    experiment: str = "janus-pipeline"
    """MLflow experiment that holds the runs."""
    parent_run_id: str | None = None
    """Nest this job's run under this run; default $JANUS_PARENT_RUN_ID."""
    system_metrics_interval_s: float = 10.0
    """Training stages: sample CPU, memory, disk, network and (NVML) GPU use every N seconds on each node into
    the stage's run as ``system/node<i>/...``; 0 = off."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tracking.backend must be one of {BACKENDS}, got {self.backend!r}")


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


DATASET_CONTEXTS = ("source", "input", "output", "training", "evaluation")
"""How a run relates to a dataset it logs: read from outside the pipeline (source), read (input), written
(output), trained on (training), evaluated on (evaluation). A dataset's name and digest are the same
wherever it appears, so lineage is a search for the run that logged that digest as its output."""
CONTEXT_TAG = "mlflow.data.context"


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as MLflow records it: what it is (name), which version (digest of its manifest), where."""

    name: str
    """e.g. ``curated/digits``, ``stages/toy_janus_pro/stage3``, ``source/digits``."""
    digest: str
    """Content digest (the first 32 hex digits of its manifest's SHA-256)."""
    source: str
    """Where it lives (a file URI or any URI)."""
    profile: Mapping[str, Any] = field(default_factory=dict)
    """Counts and ratios shown with it."""
    schema: Mapping[str, Any] = field(default_factory=dict)
    """Its record format."""

    @classmethod
    def of_manifest(cls, name: str, manifest: str | Path, profile: Mapping[str, Any] | None = None) -> DatasetRef:
        """The dataset a manifest file describes; its digest is the manifest's bytes."""
        path = Path(manifest)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        return cls(name, digest, path.parent.resolve().as_uri(), dict(profile or {}), _SCHEMA)


_SCHEMA = {"format": "webdataset", "members": "data_prep.schema (jpg|png|webp, txt, json, vq.npy, latent.npy)"}


class Tracker:
    """No-op base; subclasses record. ``log_*`` never raise for a closed tracker."""

    run_id: str | None = None

    def log_datasets(self, datasets: Sequence[DatasetRef], context: str) -> None:
        """Record datasets this run relates to (``context`` in DATASET_CONTEXTS)."""

    def log_model(
        self, model_dir: str | Path, name: str, *, tags: Mapping[str, str] | None = None, step: int = 0
    ) -> str | None:
        """Record an MLflow-format model directory as a logged model of this run; returns its id."""
        return None

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float]) -> None:
        """Record metrics of a logged model (e.g. its evaluation), in this run."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, name: str) -> None:
        """Record a JSON-serialisable object as an artifact file ``name``."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(redact(obj), indent=2, sort_keys=True, default=str))
            self.log_artifact(p, str(Path(name).parent) if "/" in name else None)

    def log_image(self, image: Any, name: str) -> None:
        """Record a PIL image as a PNG artifact ``name``."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / Path(name).name
            image.save(p, format="PNG")
            self.log_artifact(p, str(Path(name).parent) if "/" in name else None)

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


NoopTracker = Tracker


class JsonlTracker(Tracker):
    """Append every call as one JSON line; artifacts are copied beside the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _write(self, kind: str, payload: Mapping[str, Any]) -> None:
        if self._fh.closed:
            return
        self._fh.write(json.dumps({"time": time.time(), "kind": kind, **payload}, default=str) + "\n")
        self._fh.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write("params", {"params": redact_params(params)})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._write("metrics", {"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write("artifact", {"path": str(path), "artifact_path": artifact_path})

    def log_datasets(self, datasets: Sequence[DatasetRef], context: str) -> None:
        _check_context(context)
        for d in datasets:
            self._write("dataset", {"context": context, "name": d.name, "digest": d.digest, "source": d.source})

    def close(self, status: str = "FINISHED") -> None:
        self._write("close", {"status": status})
        self._fh.close()


def _check_context(context: str) -> None:
    if context not in DATASET_CONTEXTS:
        raise ValueError(f"dataset context {context!r} is not one of {DATASET_CONTEXTS}")


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside the database file, not into the working dir."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


class MlflowTracker(Tracker):
    """One MLflow run, driven through ``MlflowClient`` (no global active-run state)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        *,
        parent_run_id: str | None = None,
        run_key: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(cfg)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).resolve().parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(cfg.experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_key:
            all_tags[RUN_KEY_TAG] = run_key
        existing = self._find(run_key) if run_key else None
        if existing is not None:
            self.run_id = existing
            self.client.update_run(existing, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
        self._closed = False

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri))
        except Exception:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _find(self, run_key: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_PARAM_MAX]) for k, v in redact_params(params).items()]
        have = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in have]  # a resumed run keeps its first values
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_METRIC_NAME_RE.sub("_", k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact_text(str(v)))

    def log_datasets(self, datasets: Sequence[DatasetRef], context: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        _check_context(context)
        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type="local" if d.source.startswith("file:") else "external",
                    source=json.dumps({"uri": d.source}),
                    schema=json.dumps(redact(dict(d.schema)), sort_keys=True),
                    profile=json.dumps(redact(dict(d.profile)), sort_keys=True, default=str),
                ),
                [InputTag(CONTEXT_TAG, context)],
            )
            for d in datasets
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(
        self, model_dir: str | Path, name: str, *, tags: Mapping[str, str] | None = None, step: int = 0
    ) -> str | None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        clean = {k: redact_text(str(v)) for k, v in (tags or {}).items()}
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=self.run_id, tags=clean, model_type="janus"
        )
        try:
            self.client.log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import LoggedModelInput, Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_METRIC_NAME_RE.sub("_", k), float(v), ts, 0, model_id=model_id)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self.client.set_terminated(self.run_id, status=status)


class MultiTracker(Tracker):
    """Fan every call out to several trackers (MLflow on rank 0 + JSONL on every rank)."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers
        self.run_id = next((t.run_id for t in trackers if t.run_id), None)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def log_datasets(self, datasets: Sequence[DatasetRef], context: str) -> None:
        for t in self.trackers:
            t.log_datasets(datasets, context)

    def log_model(
        self, model_dir: str | Path, name: str, *, tags: Mapping[str, str] | None = None, step: int = 0
    ) -> str | None:
        ids = [t.log_model(model_dir, name, tags=tags, step=step) for t in self.trackers]
        return next((i for i in ids if i), None)

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log_model_metrics(model_id, metrics)

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.close(status)


def build_tracker(
    cfg: TrackingConfig,
    run_name: str,
    *,
    rank: int = 0,
    jsonl_path: str | Path | None = None,
    run_key: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Tracker:
    """The tracker of one job or stage: MLflow on rank 0 (nested under the pipeline run), JSONL anywhere."""
    trackers: list[Tracker] = []
    if cfg.backend in ("mlflow", "jsonl") and jsonl_path is not None:
        trackers.append(JsonlTracker(jsonl_path))
    if cfg.backend == "mlflow" and rank == 0:
        parent = cfg.parent_run_id or os.environ.get(PARENT_ENV)
        trackers.append(MlflowTracker(cfg, run_name, parent_run_id=parent, run_key=run_key, tags=tags))
    if not trackers:
        return NoopTracker()
    return trackers[0] if len(trackers) == 1 else MultiTracker(*trackers)


@contextlib.contextmanager
def system_metrics(cfg: TrackingConfig, run_id: str | None, node_id: str) -> Iterator[None]:
    """MLflow's system metrics of this machine into ``run_id`` while the block runs (one per node)."""
    if cfg.backend != "mlflow" or not run_id or cfg.system_metrics_interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=cfg.system_metrics_interval_s,
        resume_logging=True,  # a restarted stage continues its steps
        node_id=node_id,
        tracking_uri=resolve_uri(cfg),
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@contextlib.contextmanager
def pipeline_run(
    cfg: TrackingConfig, name: str, tags: Mapping[str, str] | None = None, run_key: str | None = None
) -> Iterator[Tracker]:
    """The parent run of one pipeline invocation; jobs started inside it nest under it.

    With ``run_key`` a rerun (e.g. a resumed training job) continues the same parent run.
    """
    if cfg.backend != "mlflow":
        yield NoopTracker()
        return
    outer = cfg.parent_run_id or os.environ.get(PARENT_ENV)
    tags = {"janus.kind": "pipeline", **(tags or {})}
    tracker = MlflowTracker(cfg, name, parent_run_id=outer, run_key=run_key, tags=tags)
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = tracker.run_id or ""
    try:
        with tracker:
            yield tracker
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
