"""The training step on one device: tokens/s, TFLOP/s, MFU, peak memory and step time per setting.

    python benchmarks/gpu_step.py                                   # GPU: janus_pro_1b and janusflow_1_3b
    python benchmarks/gpu_step.py --flavors janus_pro_7b --settings shipped,ac
    python benchmarks/gpu_step.py --flavors debug --steps 3 --warmup 1   # CPU: the debug flavor (CI)

What every training worker runs (training.step with FSDP2 on a mesh of one device, bf16 on a GPU,
the packed attention kernel, chunked cross-entropy), on synthetic packed batches: random weights, the
stage II freeze, AdamW, micro-batches of ``--micro`` samples mixed understanding : text : generation =
2 : 3 : 5 and packed into rows of the recipe's max_len (4096; 512 for debug), generation targets precomputed
(VQ ids / VAE latents, as the mixer writes them). Settings per flavor:

- ``shipped``: the recipe's parallel settings (configs/train/<flavor>.yaml: compile off, activation
  checkpointing on for 7B only);
- ``compile`` / ``ac`` / ``compile+ac`` / ``plain``: torch.compile per block and activation checkpointing
  on or off;
- ``recipe-batch``: the shipped settings at the recipe's stage II batch per GPU (512 over 128 GPUs = 4).

``--precision`` sets the compute dtype (auto: bf16 on a GPU, fp32 on the CPU, as the recipes do). On the 2-core
development CPU (which has AMX bf16) the debug step took 0.316 s in fp32 and 0.387 s in bf16 (6 steps each):
its matrices are too small for bf16 to pay there, so the CPU recipes stay fp32.

MFU = the project's FLOP count (model.flops, the MFU the trainer logs) / the device's dense bf16 peak
(989 TFLOP/s for H100/H200). Imports only torch, transformers, diffusers and the project's model/ and
parallelism code, so it runs on a machine without Ray, MLflow or the data stack.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data_prep.schema import Sample, SampleMeta, Turn
from model.build import ModelConfig, build_collate, build_model, build_task
from model.family import get_family
from model.flavors import get_flavor
from model.flops import flops_per_batch, peak_flops
from model.freeze import apply_freeze
from model.tokenizer import build_debug_tokenizer
from training.parallelize import PRECISIONS, ParallelConfig, compute_dtype
from training.step import TrainStep, build_optimizer, parallelize_task

SHIPPED = {  # configs/train/<flavor>.yaml: parallel.compile, parallel.activation_checkpointing
    "janus_pro_1b": (False, False),
    "janusflow_1_3b": (False, False),
    "janus_pro_7b": (False, True),
    "debug": (False, False),
}
RECIPE_MICRO = 4
"""Stage II of the shipped recipes: global batch 512 over 128 GPUs."""
SETTINGS = ("shipped", "plain", "compile", "ac", "compile+ac", "recipe-batch")
MIX = (("und", 2), ("text", 3), ("gen", 5))


def _png(rng: np.random.Generator, size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _chars(rng: np.random.Generator, low: int, high: int, scale: float) -> str:
    return "x" * max(1, int(rng.integers(low, high) * scale))


def synthetic_samples(flavor_name: str, family: str, n: int, max_len: int, seed: int = 0) -> list[Sample]:
    """``n`` samples in the 2:3:5 mix; text lengths scale with max_len (understanding answers 20-200
    tokens, text 100-1500, generation prompts 20-120, at 4096)."""
    flavor, rng, scale = get_flavor(flavor_name), np.random.default_rng(seed), max_len / 4096
    kinds = [k for k, w in MIX for _ in range(w)]
    n_img = flavor.num_image_tokens(family)
    samples = []
    for i in range(n):
        kind, key = kinds[i % len(kinds)], f"s{i}"
        if kind == "und":
            turns = [Turn("user", "<image>\nWhat is shown?"), Turn("assistant", _chars(rng, 20, 200, scale))]
            meta = SampleMeta("bench", key, "chart_doc", conversation=turns)
            samples.append(Sample(key, meta, _png(rng), "png"))
        elif kind == "text":
            samples.append(Sample(key, SampleMeta("bench", key, "text"), text=_chars(rng, 100, 1500, scale)))
        else:
            vq = latent = None  # the mixer's precomputed targets: VQ ids or VAE latents
            if get_family(family).tokenizer.name == "vq":
                vq = rng.integers(0, flavor.vq.codebook_size, n_img).astype(np.int32)
            else:
                f = flavor.flow
                latent = rng.standard_normal((f.latent_channels, f.latent_size, f.latent_size)).astype(np.float32)
            meta = SampleMeta("bench", key, "t2i")
            samples.append(Sample(key, meta, _png(rng), "png", text=_chars(rng, 20, 120, scale), vq=vq, latent=latent))
    return samples


def build_batches(flavor_name: str, family: str, micro: int, max_len: int, count: int) -> list[dict]:
    """``count`` collated CPU batches (the byte-level debug tokenizer's ids are valid in every vocabulary)."""
    cfg = ModelConfig(flavor=flavor_name, family=family, max_len=max_len, pack=True)
    collate = build_collate(get_flavor(flavor_name), cfg, build_debug_tokenizer())
    samples = synthetic_samples(flavor_name, family, micro * count, max_len)
    rng = np.random.default_rng(1)
    rng.shuffle(samples)
    return [collate(samples[i * micro : (i + 1) * micro]) for i in range(count)]


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's RSS


def run_setting(flavor_name: str, setting: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Build, warm up and time one setting; returns its figures."""
    flavor = get_flavor(flavor_name)
    family = flavor.family(None)
    compile_on, ac_on = SHIPPED.get(flavor_name, (False, False))
    if setting in ("plain", "compile", "ac", "compile+ac"):
        compile_on, ac_on = "compile" in setting, "ac" in setting
    micro = RECIPE_MICRO if setting == "recipe-batch" else args.micro
    max_len = args.max_len or (4096 if flavor_name != "debug" else 512)
    batches = build_batches(flavor_name, family, micro, max_len, count=4)
    parallel = ParallelConfig(
        device=device.type,
        activation_checkpointing=ac_on,
        compile=compile_on,
        compile_backend=args.compile_backend,
        mixed_precision=args.precision,
    )
    torch.manual_seed(0)
    model = build_model(flavor, family)
    apply_freeze(model, family, 2)
    task = build_task(model, flavor, ModelConfig(flavor=flavor_name, family=family, max_len=max_len, pack=True))
    parallelize_task(task, model, parallel, device)
    optimizer = build_optimizer(task, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = TrainStep(
        task,
        optimizer,
        scheduler,
        device=device,
        accum=1,
        grad_clip=1.0,
        count=lambda b: flops_per_batch(flavor, family, b, stage=2),
    )
    feed = iter(batches * (args.warmup + args.steps))
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(feed)
    step.flush(micro)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        step(feed)
    m = step.flush(micro, peak_flops(device, args.peak_tflops))
    result = {
        "flavor": flavor_name,
        "setting": setting,
        "precision": str(compute_dtype(parallel, device.type)).removeprefix("torch."),
        "compile": compile_on,
        "ac": ac_on,
        "micro": micro,
        "rows": sum(b["input_ids"].shape[0] for b in batches) / len(batches),
        "tokens_per_step": m["tokens_per_s"] * m["step_time_s"],
        "step_time_s": m["step_time_s"],
        "tokens_per_s": m["tokens_per_s"],
        "tflops_per_s": m["tflops_per_s_per_device"],
        "mfu": m.get("mfu"),
        "peak_mem_gib": _peak_memory_gib(device),
        "warmup_s": warmup_s,
        "loss": m["loss"],
    }
    del step, optimizer, scheduler, task, model
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_table(rows: list[dict], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mem = "peak GiB" if device.type == "cuda" else "max RSS GiB"
    print(f"\ntraining step on one {name}: packed rows, stage II freeze, AdamW, {rows[0]['micro']} samples/micro-batch")
    head = f"{'flavor':<16}{'setting':<14}{'micro':>6}{'rows':>6}{'tok/step':>10}{'step s':>9}{'tokens/s':>11}"
    print(head + f"{'TFLOP/s':>9}{'MFU':>7}{mem:>13}{'warm-up s':>11}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"{r['flavor']:<16}{r['setting']:<14}{r['micro']:>6}{r['rows']:>6.1f}{r['tokens_per_step']:>10.0f}"
            f"{r['step_time_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['tflops_per_s']:>9.2f}{mfu:>7}"
            f"{r['peak_mem_gib']:>13.1f}{r['warmup_s']:>11.1f}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavors", default=None, help="comma-separated (default: GPU janus_pro_1b,janusflow_1_3b)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated of {SETTINGS}")
    parser.add_argument("--micro", type=int, default=24, help="samples per micro-batch")
    parser.add_argument("--max-len", type=int, default=0, help="packed row length (0: 4096, debug 512)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: known GPUs)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on a GPU, fp32 on the CPU (the recipes')"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "janus_pro_1b,janusflow_1_3b" if device.type == "cuda" else "debug"
    flavors = (args.flavors or default).split(",")
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; valid: {list(SETTINGS)}")
    rows = []
    for flavor_name in flavors:
        for setting in settings:
            try:
                rows.append(run_setting(flavor_name, setting, args, device))
                print(json.dumps(rows[-1]), flush=True)
            except torch.OutOfMemoryError as exc:
                print(f"{flavor_name} {setting}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    if rows:
        print_table(rows, device)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
