"""Training throughput: our Ray Train + FSDP2 loop against a plain torchrun FSDP2 loop, and the data path.

    .venv/bin/python benchmarks/train_throughput.py [--steps 24] [--warmup 4] [--family janus_pro]

Both loops run the same model (debug flavor), the same stage (II: everything but SigLIP/VQ trains), the
same step code (training.runner.StageRunner) and the same batches from the same shards on 2 CPU
workers over gloo; only the harness differs (Ray Train workers fed by Ray Data streaming_split vs torchrun
processes reading the tars directly). Targets: Ray/torchrun tokens/s >= 0.9; data path samples/s >= 5x
what the training loop consumes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import toy_render
from data_prep.schema import Sample, SampleMeta, encode_sample, make_key
from data_prep.shards import read_samples, write_tar

WORKERS = 2
GLOBAL_BATCH = 8


def write_shards(root: Path, n: int) -> Path:
    """Toy samples of three tasks (t2i shapes, chart questions, text), interleaved, in WORKERS shards."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            img, facts = toy_render.render_shapes(rng, 64, 3)
            meta = SampleMeta(source="shapes", source_key=str(i), task="t2i")
            samples.append(Sample(make_key("shapes", str(i)), meta, _png(img), "png", text=facts["caption"]))
        elif kind == 1:
            img, facts = toy_render.render_chart(rng, 64)
            q, a = facts["qas"][0]
            conv = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
            meta = SampleMeta(source="charts", source_key=str(i), task="chart_doc", conversation=conv)
            samples.append(Sample(make_key("charts", str(i)), meta, _png(img), "png"))
        else:
            meta = SampleMeta(source="text", source_key=str(i), task="text")
            samples.append(Sample(make_key("text", str(i)), meta, text=toy_render.render_text(rng)["text"]))
    folder = root / "stage_II"
    per = n // WORKERS
    for s in range(WORKERS):
        write_tar(folder / f"stage_II-{s:06d}.tar", [encode_sample(x) for x in samples[s * per : (s + 1) * per]])
    return root


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overrides(data: Path, out: Path, steps: int, family: str) -> list[str]:
    return [
        f"data_root={data}",
        "stages=[II]",
        "stage_init=model",
        f"model.family={family}",
        "model.max_len=512",
        f"stage.II.steps={steps}",
        f"stage.II.global_batch={GLOBAL_BATCH}",
        "stage.II.warmup_steps=0",
        f"checkpoint.dir={out / 'ckpt'}",
        f"checkpoint.every_steps={10 * steps}",
        "tracking.backend=jsonl",
        f"scaling.num_workers={WORKERS}",
        "scaling.cpus_per_worker=0.5",
        "name=bench",
        "parallel.device=cpu",
    ]


def step_metrics(jsonl: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    steps = [r["metrics"] for r in rows if r["kind"] == "metrics" and "tokens_per_s" in r["metrics"]][warmup:]
    return {
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps),
        "samples_per_s": statistics.median(m["samples_per_s"] for m in steps),
        "data_wait_s": statistics.median(m["data_wait_s"] for m in steps),
        "steps": len(steps),
    }


def run_ray(data: Path, out: Path, steps: int, family: str, warmup: int) -> dict[str, float]:
    import ray

    from common.config import load_config
    from training.config import TrainConfig
    from training.stages import run_training, stage_dir

    cfg = load_config(TrainConfig, None, overrides(data, out, steps, family))
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    try:
        run_training(cfg)
    finally:
        ray.shutdown()
    return step_metrics(stage_dir(cfg, "II") / "logs" / "rank0.jsonl", warmup)


def torchrun_worker(args: argparse.Namespace) -> None:
    """One process of the plain torchrun loop (rank r reads shard r, like the Ray split does)."""
    import torch
    import torch.distributed as dist

    from common.config import load_config
    from training.config import TrainConfig
    from training.runner import StageRunner

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(TrainConfig, None, overrides(Path(args.data), Path(args.out), args.steps, args.family))
    runner = StageRunner(cfg, "II", device=torch.device("cpu"), init_weights=None, stage_dir=args.out)
    tars = sorted((Path(args.data) / "stage_II").glob("*.tar"))
    samples = list(read_samples(tars[rank]))

    def batches():
        while True:
            for i in range(0, len(samples) - runner.micro + 1, runner.micro):
                yield samples[i : i + runner.micro]

    it, rows = batches(), []
    for _ in range(args.steps):
        runner.step(it)
        rows.append({"kind": "metrics", "metrics": runner.flush()})  # per step, as the Ray run logs
    if rank == 0:
        Path(args.result).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(data: Path, out: Path, steps: int, family: str, warmup: int) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "torchrun.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORKERS}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        __file__,
        "--torchrun-worker",
        "--data",
        str(data),
        "--out",
        str(out / "tr"),
        "--steps",
        str(steps),
        "--family",
        family,
        "--result",
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return step_metrics(result, warmup)


def run_data_path(data: Path, micro: int) -> dict[str, float]:
    """Ray Data read -> rows -> Samples -> collate, as a worker does it, with no training."""
    import ray

    from model.build import ModelConfig, build_collate
    from model.flavors import get_flavor
    from training.runner import rows_to_samples
    from training.stages import build_stage_dataset

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    try:
        ds = build_stage_dataset(sorted((data / "stage_II").glob("*.tar")))
        collate = build_collate(get_flavor("debug"), ModelConfig(flavor="debug", max_len=512))
        n, start = 0, time.perf_counter()
        for _ in range(3):
            for batch in ds.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True):
                collate(rows_to_samples(batch))
                n += micro
        return {"samples_per_s": n / (time.perf_counter() - start)}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--family", default="janus_pro", choices=["janus_pro", "janusflow"])
    parser.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun_worker:
        torchrun_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        root = Path(tmp)
        data = write_shards(root / "data", n=GLOBAL_BATCH * (args.steps + 2))
        ray_m = run_ray(data, root / "ray", args.steps, args.family, args.warmup)
        torch_m = run_torchrun(data, root / "torchrun", args.steps, args.family, args.warmup)
        data_m = run_data_path(data, GLOBAL_BATCH // WORKERS)
    ratio = ray_m["tokens_per_s"] / torch_m["tokens_per_s"]
    # Each worker feeds itself: compare one consumer's data path with one worker's consumption.
    data_ratio = data_m["samples_per_s"] / (ray_m["samples_per_s"] / WORKERS)
    print(
        f"\ntrain throughput, debug flavor ({args.family}), stage II, {WORKERS} CPU workers, global batch "
        f"{GLOBAL_BATCH}, median over {ray_m['steps']} steps after {args.warmup} warm-up"
    )
    print(f"{'loop':<28}{'tokens/s':>12}{'samples/s':>12}{'data wait s':>13}")
    for name, m in (("Ray Train + Ray Data", ray_m), ("plain torchrun", torch_m)):
        print(f"{name:<28}{m['tokens_per_s']:>12.1f}{m['samples_per_s']:>12.2f}{m['data_wait_s']:>13.4f}")
    print(f"{'data path alone, 1 worker':<28}{'':>12}{data_m['samples_per_s']:>12.2f}")
    print(f"ratio Ray / torchrun tokens/s: {ratio:.3f}  (target >= 0.9)")
    print(f"ratio data path / one worker's consumption: {data_ratio:.1f}x  (target >= 5x)")


if __name__ == "__main__":
    main()
