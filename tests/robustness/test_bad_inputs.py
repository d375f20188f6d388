"""Bad inputs through the real curation job (CLI entry point, local Ray, real MLflow store): every input ends
kept or as a named reject in the ledger, accounting is exact, nothing is unpickled, no member escapes, no
secret is recorded, and a Ray worker killed mid-job changes no output byte."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from common import faults
from common.config import load_config
from common.faults import Fault
from data_prep.curation import DRILL_UNIT, CurateConfig, run_curation
from data_prep.schema import decode_sample
from data_prep.shards import iter_tar_records
from pipelines.curate import main
from tests.data_prep.curate_fixtures import ray_local  # noqa: F401
from tests.data_prep.dedup_reference import assert_job_agrees_with_reference
from tests.robustness.bad_inputs import BadCorpus, build_bad_corpus

pytestmark = pytest.mark.ray
SECRET_ENV_NAME = "MY_API_TOKEN"
SECRET_ENV = "s3cr3t-from-env-7f3a9c"
SECRET_LITERAL = "hunter2-literal-e41b"


@dataclass
class Run:
    root: Path
    out: Path
    config: Path
    corpus: BadCorpus
    printed: str


def _config(corpus: BadCorpus, root: Path, out: Path, **exec_kw) -> Path:
    sources = [dict(s) for s in corpus.sources]
    # secrets in the config: an env interpolation under a secret-looking name and under a plain one, and a
    # literal under a secret-looking name (score columns that do not exist, so curation is unaffected)
    sources[0]["score_fields"] = {
        "api_token": f"${{oc.env:{SECRET_ENV_NAME}}}",
        "aesthetic": f"${{oc.env:{SECRET_ENV_NAME}}}",
        "db_password": SECRET_LITERAL,
    }
    cfg = {
        "out_dir": str(out),
        "sources": sources,
        "shards": {"samples_per_shard": 4},
        "exec": {"progress": False, **exec_kw},
        "tracking": {"backend": "mlflow", "uri": f"sqlite:///{root}/mlflow.db", "experiment": "robustness"},
    }
    path = root / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local) -> Run:  # noqa: F811
    root = tmp_path_factory.mktemp("bad")
    corpus = build_bad_corpus(root / "in")
    out = root / "out"
    config = _config(corpus, root, out)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        mp.setenv(SECRET_ENV_NAME, SECRET_ENV)
        assert main(["--config", str(config)]) == 0
    return Run(root, out, config, corpus, printed.getvalue())


def _kept(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("*.parquet")) for k in pq.read_table(p)["source_key"].to_pylist()]


def _ledger(folder: Path) -> list[dict]:
    return pq.read_table(folder / "rejects" / "rejects.parquet").to_pylist()


def test_every_case_ends_kept_or_as_its_named_reason(run: Run) -> None:
    want = Counter((c.source, c.source_key, c.outcome) for c in run.corpus.cases)
    got: Counter = Counter()
    for src in run.corpus.sources:
        folder = run.out / src["name"]
        got.update((src["name"], k, "kept") for k in _kept(folder))
        got.update((src["name"], r["source_key"], r["reason"]) for r in _ledger(folder))
    what = {(c.source, c.source_key, c.outcome): c.what for c in run.corpus.cases}
    missing = [f"{k} ({what[k]})" for k in sorted(want - got)]
    unexpected = sorted(got - want)
    assert not missing and not unexpected, f"expected but not found: {missing}\nfound instead: {unexpected}"


def test_accounting_is_exact(run: Run) -> None:
    for src in run.corpus.sources:
        m = json.loads((run.out / src["name"] / "manifest.json").read_text())
        cases = [c for c in run.corpus.cases if c.source == src["name"]]
        kept = sum(c.outcome == "kept" for c in cases)
        assert (m["inputs"], m["kept"], m["rejected"]) == (len(cases), kept, len(cases) - kept), src["name"]
        assert sum(m["rejects_by_reason"].values()) == m["rejected"]


def test_rejects_name_the_file_and_line(run: Run) -> None:
    by_key = {
        (r["source_key"], r["reason"]): r for src in ("manifest", "tables", "tars") for r in _ledger(run.out / src)
    }
    manifest = run.corpus.sources[0]["path"]
    line = by_key[("manifest.jsonl:29", "bad_json")]
    assert line["location"] == f"{manifest}:29" and "list" in line["detail"]
    assert by_key[("missing", "missing_file")]["detail"].endswith("images/nope.jpg")
    for name in ("d_empty.parquet", "e_garbage.parquet"):
        row = by_key[(f"{name}#unreadable", "corrupt_file")]
        assert row["location"].endswith(name) and name in row["detail"]
    for name in ("d-000003.tgz", "e-000004.tar", "f-000005.tar"):
        row = by_key[(f"{name}#unreadable", "corrupt_archive")]
        assert row["location"].endswith(name) and name in row["detail"]
    assert "c-000002.tar" in by_key[("t2", "truncated_archive")]["detail"]
    assert "'../escape.jpg'" in by_key[("escape", "unsafe_member_name")]["detail"]
    for src in ("manifest", "tables", "tars"):
        assert all(r["location"] and r["reason"] and r["key"] for r in _ledger(run.out / src))


def test_kept_images_are_8bit_rgb(run: Run) -> None:
    for src in run.corpus.sources:
        for tar in sorted((run.out / src["name"]).glob("*.tar")):
            for record in iter_tar_records(tar):
                sample = decode_sample(record)
                img = Image.open(io.BytesIO(sample.image))
                assert img.mode == "RGB", (sample.meta.source_key, img.mode)
                assert (img.width, img.height) == (sample.meta.width, sample.meta.height)


def test_nothing_is_ever_unpickled(run: Run) -> None:
    m = json.loads((run.out / "tars" / "manifest.json").read_text())
    assert m["ignored_members"] == run.corpus.pickle_members  # seen and counted, never read
    assert not run.corpus.marker.exists(), "a pickle from the input was unpickled"


def test_no_archive_member_lands_outside_the_output(run: Run) -> None:
    # members named ../escape, /abs/evil and dir/../../up are rejected, never extracted anywhere
    written = {p.name.split(".", 1)[0] for p in run.root.parent.rglob("*") if p.is_file()}
    assert not {"escape", "evil", "up"} & written
    assert not Path("/abs").exists()
    assert {p.name for p in run.out.iterdir()} == {"manifest", "tables", "tars", "_logs"}


def test_secrets_reach_neither_mlflow_nor_logs(run: Run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.root}/mlflow.db")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("robustness").experiment_id])
    source = json.loads(mlrun.data.params["sources"])[0]  # lists are logged as JSON text
    assert source["score_fields"]["api_token"] == source["score_fields"]["db_password"] == "***"
    assert source["score_fields"]["aesthetic"] == "***"  # an env secret under a harmless name
    assert source["key_field"] == "" and source["score_fields"]["clip"] == "similarity"
    recorded = [run.root / "mlflow.db", *(run.root / "mlartifacts").rglob("*"), *run.out.rglob("*")]
    files = [p for p in recorded if p.is_file()]
    assert any(p.name == "config.resolved.yaml" for p in files) and any(p.suffix == ".jsonl" for p in files)
    for secret in (SECRET_ENV, SECRET_LITERAL):
        assert secret.encode() not in b"".join(p.read_bytes() for p in files)
        assert secret not in run.printed


def test_killed_ray_worker_changes_no_output_byte(run: Run, tmp_path: Path, monkeypatch) -> None:
    """A drill SIGKILLs the Ray worker processing unit 6 (once); Ray Data retries the task. Ray was started
    (by the module's fixture) before the drill was armed: the job hands the drill to its tasks itself."""
    monkeypatch.setenv(SECRET_ENV_NAME, SECRET_ENV)
    out = tmp_path / "out"
    path = _config(run.corpus, tmp_path, out, keep_work=True)
    cfg = load_config(CurateConfig, path, ["tracking.backend=none"])
    marker = tmp_path / "fault_killed_unit6"
    with faults.arm(Fault(DRILL_UNIT, "kill", when={"unit": 6}, once=str(marker))):
        run_curation(cfg)
    assert marker.is_file(), "the drill did not fire"
    pid = int(re.search(r"pid (\d+)", marker.read_text()).group(1))
    assert pid != os.getpid() and not Path(f"/proc/{pid}").exists(), "the drill did not kill the Ray worker"
    for src in run.corpus.sources:
        ref = {p.relative_to(run.out): p.read_bytes() for p in (run.out / src["name"]).rglob("*") if p.is_file()}
        got = {p.relative_to(out): p.read_bytes() for p in (out / src["name"]).rglob("*") if p.is_file()}
        assert got == ref, src["name"]
    # and the distributed dedup dropped what the single-pass reference drops (repeated keys in this corpus)
    assert assert_job_agrees_with_reference(cfg, out) > 0
