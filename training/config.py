"""The training recipe: model, stages (the papers' tables), optimizer, parallelism, checkpoints, tracking."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.tracking import TrackingConfig
from model.build import ModelConfig, resolve_family
from model.flavors import get_flavor
from model.freeze import trained_groups
from training.outputs import PreviewConfig
from training.parallelize import ParallelConfig

STAGE_NAMES = ("I", "II", "III")
SCHEDULES = ("constant", "cosine")


@dataclass(kw_only=True)
class StageConfig:
    shards: str = ""
    """Folder of this stage's shards (written by pipelines.mix); a relative one is under data_root or the mixture's."""
    steps: int = 10
    """Optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr."""
    schedule: str = "constant"
    """After warm-up: constant (the papers) or cosine down to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule."""
    global_batch: int = 8
    """Samples per optimizer step over all workers (micro_batch x workers x accumulation)."""
    micro_batch: int = 0
    """Samples per worker per forward; 0 = global_batch / workers (no accumulation)."""
    also_train: list[str] = field(default_factory=list)
    """Freeze groups (model.freeze.PARAM_GROUPS) trained in this stage besides the family's schedule: a
    departure from the paper for a reason, e.g. ``[siglip]`` where the flavor's SigLIP is random, not
    pretrained (the debug flavor), and frozen would only be a random projection."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"stage.{name} must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.micro_batch < 0:
            raise ValueError(f"stage: lr must be > 0 and warmup_steps, micro_batch >= 0 ({self})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"stage.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, accumulation steps) for this world size; the global batch must divide evenly."""
        micro = self.micro_batch or self.global_batch // world_size
        if micro <= 0 or self.global_batch % (micro * world_size):
            raise ValueError(
                f"stage.global_batch={self.global_batch} is not a multiple of micro_batch={micro} x "
                f"{world_size} workers"
            )
        return micro, self.global_batch // (micro * world_size)


@dataclass(kw_only=True)
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (the papers: 0.9, 0.95)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the papers: 0)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "outputs/checkpoints"
    """Ray Train storage path: one run folder per stage, its checkpoints, and the stage handoff weights."""
    every_steps: int = 100
    """Save every N optimizer steps (and always at the end of a stage)."""
    keep: int = 2
    """Checkpoints kept per stage (Ray deletes older ones)."""

    def __post_init__(self) -> None:
        if self.every_steps <= 0 or self.keep <= 0:
            raise ValueError(f"checkpoint.every_steps and checkpoint.keep must be > 0 ({self})")


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    """Training workers (one per GPU on a cluster)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    max_failures: int = 2
    """Worker-group restarts Ray Train makes before the stage fails (each resumes from the last checkpoint)."""

    def __post_init__(self) -> None:
        if self.num_workers <= 0:
            raise ValueError(f"scaling.num_workers must be > 0, got {self.num_workers}")


@dataclass(kw_only=True)
class RegistryConfig:
    name: str | None = None
    """MLflow Model Registry name: the run's last stage registers its logged model as a new version, tagged
    with the recipe and the data it was trained on; None = do not register."""


@dataclass(kw_only=True)
class TrainConfig:
    name: str = "debug"
    """Run name: stage runs are {name}-stage_{S}; the same name resumes."""
    seed: int = 0
    """Seeds model init, data order and every random draw."""
    mixture: str = ""
    """The mix recipe (configs/data/mix_*.yaml) whose stage shards this trains on: relative stage shard folders
    are under its {out_dir}/{recipe}. A relative path is from the working directory, else from the repository."""
    data_root: str = ""
    """Root of relative stage shard folders; when set it wins over mixture (neither: outputs/stages)."""
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    """Which stages to run, in order (e.g. [II, III] to start from stage I's weights)."""
    stage_init: str = "previous"
    """Where a stage after I starts: previous (that stage's final weights; an error if missing) or
    model (model.path, or random init: ablations and benchmarks)."""
    stage: dict[str, StageConfig] = field(default_factory=lambda: {s: StageConfig() for s in STAGE_NAMES})
    """Per-stage settings, keyed I, II, III."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Flavor, family, where to start from."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW settings shared by the stages (each stage gets a fresh optimizer)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Device, FSDP/HSDP, precision, activation checkpointing, compile."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and failure handling."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and how often to save."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """Where the final model is registered."""
    log_every: int = 1
    """Log metrics every N steps."""
    sample_every: int = 0
    """Generate preview images and answers every N steps (0 = only at the end of a stage)."""
    export: bool = True
    """Export the stage's final model (Janus-Pro: HF format; JanusFlow: reference layout) and log it to MLflow as
    a logged model (an MLflow pyfunc around the export)."""
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    """Fixed prompts and questions of the preview images and answers."""
    ema_decay: float = 0.99
    """JanusFlow: EMA of the trainable weights (the released model is the EMA); 0 = off."""
    mfu_peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for the MFU metric; 0 = known GPUs by name (none on CPU)."""

    def __post_init__(self) -> None:
        for s in self.stages:
            if s not in STAGE_NAMES:
                raise ValueError(f"stages: unknown stage {s!r}; valid: {list(STAGE_NAMES)}")
            if s not in self.stage:
                raise ValueError(f"stages: {s} is listed but stage.{s} has no settings")
        if self.stages != sorted(self.stages, key=STAGE_NAMES.index):
            raise ValueError(f"stages must be in order I, II, III; got {self.stages}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.stage_init not in ("previous", "model"):
            raise ValueError(f"stage_init must be previous or model, got {self.stage_init!r}")
        if self.log_every <= 0 or self.sample_every < 0:
            raise ValueError(f"log_every must be > 0 and sample_every >= 0 ({self.log_every}, {self.sample_every})")
        family = resolve_family(get_flavor(self.model.flavor), self.model.family)
        for s in self.stages:
            try:
                trained_groups(family, stage_index(s), self.stage[s].also_train)
            except ValueError as err:
                raise ValueError(f"stage.{s}.also_train: {err}") from None


def stage_index(name: str) -> int:
    """'I' -> 1, 'II' -> 2, 'III' -> 3 (the freeze schedules' keys)."""
    return STAGE_NAMES.index(name) + 1
