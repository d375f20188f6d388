"""The generate CLI on both families (stage final/ folders and exports), and the fit_tokenizers job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from common.tracking import TrackingConfig
from model.family import get_family
from model.inference import load_for_inference
from model.janusflow_task import load_vae
from model.tokenizer import build_debug_tokenizer
from pipelines.generate import main as generate_main
from tests.cpu_math import fast_cpu_math  # noqa: F401 - autouse, module scope
from tests.pipelines.eval_fixtures import make_checkpoint, small_world
from training.tokenizers import FitOptions, FitTokenizersConfig, run_fit_tokenizers


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    world = small_world(root / "toyworld")
    cfg = FitTokenizersConfig(
        out_dir=str(root / "tokenizers"),
        toyworld_dir=str(world),
        max_images_per_source=40,
        threads=1,
        vq=FitOptions(steps=4, batch_size=4),
        vae=FitOptions(steps=4, batch_size=4),
        tracking=TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="test-fit"),
    )
    run_fit_tokenizers(cfg)
    return root


def test_fit_tokenizers_job_writes_both_and_logs(fitted: Path) -> None:
    out = fitted / "tokenizers"
    assert (out / "vq" / "model.safetensors").is_file() and (out / "vq" / "config.json").is_file()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    stats = json.loads((out / "fit_tokenizers.json").read_text())
    assert stats["images/digits"] == 40 and stats["images/shapes"] == 4  # the train split only
    assert stats["vq/psnr_after"] > 0 and stats["vae/psnr_after"] > 0
    grid = Image.open(out / "recon_vq.png")
    assert grid.size[1] > 2 * 64  # originals above reconstructions
    client = MlflowClient(f"sqlite:///{fitted / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test-fit").experiment_id])
    assert run.info.run_name == "fit_tokenizers" and "vq/psnr_after" in run.data.metrics
    assert {"recon_vq.png", "recon_vae.png", "fit_tokenizers.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }


def _pngs(folder: Path, n: int) -> None:
    files = sorted(folder.glob("*.png"))
    assert len(files) == n
    for f in files:
        img = Image.open(f)
        assert img.format == "PNG" and img.size == (64, 64)


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_generate_from_stage_checkpoint(family: str, fitted: Path, tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", family)
    vae = ["--vae", str(fitted / "tokenizers" / "vae")] if get_family(family).needs_vae else []
    out = tmp_path / "imgs"
    argv = ["--checkpoint", str(ckpt), "--prompt", "a handwritten digit 7", "--out", str(out), "--num", "2", *vae]
    assert generate_main(argv) == 0
    _pngs(out, 2)
    image = sorted((fitted / "toyworld" / "digits" / "eval" / "images").glob("*.png"))[0]
    capsys.readouterr()
    assert (
        generate_main(["--checkpoint", str(ckpt), "--image", str(image), "--question", "What digit is this?", *vae])
        == 0
    )
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (a random model may answer nothing)
    if vae:  # the fitted VAE, not a random one, decodes
        lm = load_for_inference(ckpt, vae[1])
        assert lm.vae.config.scaling_factor == load_vae(vae[1]).config.scaling_factor != 1.0


def test_stage_final_finds_the_vae_its_stage_trained_with(fitted: Path, tmp_path: Path) -> None:
    """A JanusFlow stage's final/ decodes with the VAE recorded in its stage's inputs.json; with none given,
    beside it or recorded, ``require_vae`` (the evaluation) refuses instead of decoding with a random VAE."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "janusflow")
    with pytest.raises(FileNotFoundError, match=rf"{ckpt.name}.*VAE.*looked in .*vae_path="):
        load_for_inference(ckpt, require_vae=True)
    assert load_for_inference(ckpt).vae.config.scaling_factor == 1.0  # the random VAE, with a warning
    vae = fitted / "tokenizers" / "vae"
    record = {"schema_version": 1, "sha256": "x", "inputs": {"model": {"vae_path": str(vae)}}}
    (ckpt.parent / "inputs.json").write_text(json.dumps(record))
    lm = load_for_inference(ckpt, require_vae=True)
    assert lm.vae.config.scaling_factor == load_vae(vae).config.scaling_factor != 1.0
    record["inputs"]["model"]["vae_path"] = str(tmp_path / "moved")  # recorded, but no longer there
    (ckpt.parent / "inputs.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="moved"):
        load_for_inference(ckpt, require_vae=True)


def test_generate_same_seed_same_images(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "janus_pro")
    for name in ("a", "b"):
        generate_main(
            ["--checkpoint", str(ckpt), "--prompt", "a red circle", "--out", str(tmp_path / name), "--num", "1"]
        )
    assert (tmp_path / "a" / "a_red_circle-0.png").read_bytes() == (tmp_path / "b" / "a_red_circle-0.png").read_bytes()


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_generate_from_export(family: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", family)
    lm = load_for_inference(ckpt)
    export = get_family(family).export(lm.model, build_debug_tokenizer(), tmp_path / "export")
    again = load_for_inference(export)
    assert (again.family, again.flavor.name) == (family, "debug")
    assert (
        generate_main(
            ["--checkpoint", str(export), "--prompt", "a blue square", "--out", str(tmp_path / "o"), "--num", "1"]
        )
        == 0
    )
    _pngs(tmp_path / "o", 1)


def test_generate_needs_a_prompt_or_question(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", str(tmp_path)])


def test_cfg_weight_reaches_the_sampler(tmp_path: Path) -> None:
    """None samples with the paper weight (JanusFlow 2): the same pixels as asking for 2; 1 and 5 differ."""
    from model.inference import generate_images

    lm = load_for_inference(make_checkpoint(tmp_path / "ckpt", "janusflow"))
    weights = (None, 2.0, 1.0, 5.0)
    images = {w: generate_images(lm, ["a red circle"], seed=3, cfg_weight=w)[0].tobytes() for w in weights}
    assert images[None] == images[2.0]
    assert len({images[2.0], images[1.0], images[5.0]}) == 3
    with pytest.raises(ValueError, match="cfg_weight"):
        generate_images(lm, ["a red circle"], cfg_weight=0.5)
    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x", "--cfg_weight", "0.5"])


def test_temperature_is_janus_pro_only(tmp_path: Path) -> None:
    from model.inference import generate_images

    jp = load_for_inference(make_checkpoint(tmp_path / "jp", "janus_pro"))
    hot, cold = (generate_images(jp, ["a red circle"], seed=3, temperature=t)[0].tobytes() for t in (1.0, 0.3))
    assert hot != cold
    jf = load_for_inference(make_checkpoint(tmp_path / "jf", "janusflow"))
    with pytest.raises(ValueError, match="temperature"):
        generate_images(jf, ["a red circle"], temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        generate_images(jp, ["a red circle"], temperature=0.0)
