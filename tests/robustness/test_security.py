"""Nothing is unpickled from data or from checkpoints we did not write; no archive is extracted; secrets are
masked before anything is recorded."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from common.redact import MASK, is_secret_name, redact_text
from common.tracking import TrackingConfig, build_tracker
from tests.robustness.bad_inputs import _Trap
from training.checkpoint import (
    TrainState,
    UnsafeCheckpointError,
    dcp_load,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
PRODUCT = sorted({p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"} | {"benchmarks"})
"""Every package of the repository (a new one is scanned without being listed) and the benchmark scripts."""
UNPICKLERS = {
    "pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
    "joblib.load", "pd.read_pickle", "pandas.read_pickle", "marshal.loads", "shelve.open", "yaml.unsafe_load",
}  # fmt: skip


def _unsafe_call(name: str, keywords: dict[str, str]) -> str | None:
    """Why a call may run code from the bytes it reads or write outside its folder (None: it may not)."""
    if name in UNPICKLERS:
        return "unpickles"
    if name.endswith((".extractall", ".extract")):
        return "extracts an archive to disk (members are read one by one, never extracted)"
    if name == "torch.load" and keywords.get("weights_only") != "True":
        return "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
        return "np.load without allow_pickle=False"
    if name == "yaml.load" and "SafeLoader" not in keywords.get("Loader", ""):
        return "yaml.load without SafeLoader"
    if keywords.get("trust_remote_code") == "True":
        return "runs a model repository's code"
    return None


def test_product_code_never_unpickles_or_extracts() -> None:
    assert {"data_prep", "model", "pipelines", "training", "evaluation"} <= set(PRODUCT)
    found = []
    for path in sorted(p for d in PRODUCT for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords if k.arg}
                why = _unsafe_call(ast.unparse(node.func), keywords)
                if why:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)} {why}")
    assert not found, "\n".join(found)


def _model_and_optim(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(3, 4)).sum().backward()
    optim.step()
    return model, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5)


def test_checkpoint_round_trip_through_the_safe_loader(tmp_path: Path) -> None:
    model, optim, sched = _model_and_optim(0)
    save_checkpoint(tmp_path / "ckpt", model, optim, sched, TrainState(step=7, samples_seen=21))
    other, other_optim, other_sched = _model_and_optim(1)
    state = load_checkpoint(tmp_path / "ckpt", other, other_optim, other_sched)
    assert (state.step, state.samples_seen) == (7, 21)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    assert other_optim.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)  # a non-tensor (pickled) item


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    model, optim, sched = _model_and_optim(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, optim, sched, TrainState())
    marker = tmp_path / "UNPICKLED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to load: builtins\.exec"):
        load_checkpoint(ckpt, *_model_and_optim(1))
    assert not marker.exists()


def test_checkpoint_item_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """A non-tensor item in a DCP checkpoint is a torch.save pickle; stock DCP loads it with weights_only=False."""
    marker = tmp_path / "UNPICKLED"
    dcp.save({"w": torch.ones(2), "trap": _Trap(marker)}, checkpoint_id=str(tmp_path / "ckpt"))
    target = {"w": torch.zeros(2), "trap": None}
    with pytest.raises(UnsafeCheckpointError, match="'trap': refused to load: .*GLOBAL exec"):
        dcp_load(target, tmp_path / "ckpt")
    assert not marker.exists()
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))  # the stock loader: the threat is real
    assert marker.exists()


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("hf_token", True),
        ("tracking.db_password", True),
        ("api_key", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("clientSecret", True),
        ("key", True),
        ("sources.0.key_field", False),
        ("max_new_tokens", False),
        ("checkpoint.keep", False),
        ("tokenizer_path", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_env_secrets_and_uri_passwords_are_cut_from_text(monkeypatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-0123456789")
    monkeypatch.setenv("BUILD_KEY", "1")  # too short to mask: "1" is in every number
    text = redact_text("s3://bucket?sig=tok-0123456789 at https://alice:pw-9f8e@mlflow.example.com:5000/x 1")
    assert text == "s3://bucket?sig=*** at https://***@mlflow.example.com:5000/x 1"
    assert redact_text("https://mlflow.example.com/x") == "https://mlflow.example.com/x"
    # the shell's working directory is no password ("pwd"): paths under it stay readable
    monkeypatch.setenv("PWD", "/home/alice/project")
    monkeypatch.setenv("DB_PWD", "hunter2-db")
    assert redact_text("/home/alice/project/outputs pw hunter2-db") == "/home/alice/project/outputs pw ***"


def test_secrets_never_reach_a_real_mlflow_store_or_jsonl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "xyz-env-secret-42")
    cfg = TrackingConfig(backend="mlflow", uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="secrets")
    params = {
        "hf_token": "hf_literal_secret_77",
        "tracking.uri": "https://bob:pw-literal-3c1d@mlflow.example.com",
        "note": "made with xyz-env-secret-42",
        "nested": json.dumps([{"password": "hunter2-in-a-list"}]),
        "sources.0.key_field": "id",
    }
    with build_tracker(cfg, "secrets", jsonl_path=tmp_path / "log.jsonl") as tracker:
        tracker.log_params(params)
        tracker.log_dict({"token": "hf_literal_secret_77", "text": params["note"]}, "report.json")
        tracker.set_tags({"origin": params["tracking.uri"]})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert run.data.params["hf_token"] == MASK and run.data.params["sources.0.key_field"] == "id"
    assert run.data.params["tracking.uri"] == "https://***@mlflow.example.com"
    recorded = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert json.loads(run.data.params["nested"]) == [{"password": MASK}]
    for secret in ("hf_literal_secret_77", "pw-literal-3c1d", "xyz-env-secret-42", "hunter2-in-a-list"):
        assert secret.encode() not in recorded, secret
