"""Lineage in MLflow: the datasets each job reads and writes, the model each stage logs, the registry.

Every job logs the datasets it relates to (common.tracking.DatasetRef): curate logs each source
(``source``) and each curated source's shards (``output``); mix logs the curated manifests it read
(``input``) and each stage's shards (``output``); a training stage logs its stage shards (``training``) and
its model; evaluate logs the model (an input) and attaches its metrics to it. A dataset is named and digested
the same wherever it appears, so any step back is one search: the run that logged that digest as ``output``.

    model (stage III) -> its run -> its training dataset -> the mix run that wrote it -> the curated
    datasets it read -> the curate run that wrote them -> the sources it read
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.tracking import DatasetRef, TrackingConfig, resolve_uri

STAGE_DIR_TAG = "janus.stage_dir"
"""On a stage's logged model: the stage folder (what evaluate and the registry look it up by)."""
REGISTERED_TAG = "janus.registered_model"
"""On a training (and its outer pipeline) run, ``janus.registered_model.<registry name>``: the
``models:/<name>/<version>`` it registered."""


def stage_dataset(manifest: str | Path) -> DatasetRef:
    """The stage shards a mix wrote (and a training stage reads), from their manifest."""
    data = json.loads(Path(manifest).read_text())
    folder = Path(manifest).parent
    recipe = data.get("recipe", folder.parent.name)
    profile = {
        "samples": data.get("samples"),
        "target_ratios": data.get("target_ratios"),
        "realised_ratios": data.get("realised_ratios"),
    }
    return DatasetRef.of_manifest(f"stages/{recipe}/{folder.name}", manifest, profile)


def curated_dataset(manifest: str | Path) -> DatasetRef:
    """One curated source's shards, from its manifest (curate writes it, mix reads it)."""
    data = json.loads(Path(manifest).read_text())
    keys = ("source", "kind", "task", "inputs", "kept", "rejected", "shards", "bytes")
    profile = {k: data[k] for k in keys if k in data}
    return DatasetRef.of_manifest(f"curated/{Path(manifest).parent.name}", manifest, profile)


def source_dataset(name: str, spec: Mapping[str, Any], units: list[tuple[str, int]]) -> DatasetRef:
    """A raw source as curate saw it: its spec and the files it read with their sizes (not their bytes:
    hashing 72M inputs is a job of its own)."""
    import hashlib

    blob = json.dumps({"spec": spec, "units": units}, sort_keys=True, default=str).encode()
    path = str(spec.get("path", ""))
    uri = path if "://" in path else Path(path).resolve().as_uri() if path else ""
    profile = {"units": len(units), "bytes": sum(size for _, size in units), "kind": spec.get("kind")}
    return DatasetRef(f"source/{name}", hashlib.sha256(blob).hexdigest()[:32], uri, profile)


def find_stage_model(tracking: TrackingConfig, stage_dir: str | Path) -> str | None:
    """The id of the newest READY logged model of a stage folder, or None."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(tracking))
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return None
    found = client.search_logged_models(
        [exp.experiment_id], filter_string=f"tags.`{STAGE_DIR_TAG}` = '{Path(stage_dir).resolve()}'"
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def register_model(tracking: TrackingConfig, name: str, model_id: str, tags: Mapping[str, str]) -> str:
    """A new version of registered model ``name`` from a logged model; returns ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_uri(tracking))
    try:
        client.create_registered_model(name, description="Janus-Pro / JanusFlow models trained by janus-pipeline")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    source = f"models:/{model_id}"
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.source == source:  # registered by an earlier run of the same stage
            return f"models:/{name}/{version.version}"
    logged = client.get_logged_model(model_id)
    # The registry resolves models:/<id> through the process-wide tracking URI, not this client's.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            name, source=source, run_id=logged.source_run_id, tags=dict(tags), model_id=model_id
        )
    return f"models:/{name}/{version.version}"
