"""Training: three stages of FSDP2 training driven by Ray Train, and everything a worker runs.

Nothing registers itself on import; import what you use:

- ``training.config``: ``TrainConfig`` (the recipe: stages, model, optim, parallel, scaling, checkpoint, ...).
- ``training.stages``: ``run_training(cfg)`` (the driver: one Ray Train run per stage, resume, registry).
- ``training.runner``: ``StageRunner`` and ``train_loop_per_worker`` (what each Ray Train worker runs).
- ``training.step``: ``TrainStep`` (one optimizer step without host syncs), ``parallelize_task``.
- ``training.parallelize``: mesh, FSDP2, bf16 policy, activation checkpointing, compile.
- ``training.checkpoint``: sharded DCP checkpoints, loaded without unpickling anything we did not write.
- ``training.records``: the stage inputs record (``inputs.json``) that guards against stale weights.
- ``training.outputs``: previews and the stage's exported model; ``training.progress``: the driver's console.

``training.step`` and ``training.parallelize`` import only torch and ``model`` (benchmarks/gpu_step.py runs
them on a machine without Ray or MLflow).
"""
