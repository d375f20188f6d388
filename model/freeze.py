"""Freeze schedules per family and stage, as data (JANUS_SPEC recipe tables), applied by parameter name.

Every parameter belongs to exactly one group (by name prefix); a stage lists the groups that train. A
parameter no group claims is an error, so a new module cannot silently train (or silently freeze).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

PARAM_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "janus_pro": {
        "llm": ("model.language_model.", "lm_head."),
        "siglip": ("model.vision_model.",),
        "und_aligner": ("model.aligner.",),
        "vq": ("model.vqmodel.",),
        "gen_embed": ("model.generation_embeddings.",),
        "gen_aligner": ("model.generation_aligner.",),
        "gen_head": ("model.generation_head.",),
    },
    "janusflow": {
        "llm": ("language_model.",),
        "siglip": ("vision_und_enc_model.",),
        "und_aligner": ("vision_und_enc_aligner.", "beg_of_und_embed"),
        "gen_encoder": ("vision_gen_enc_model.",),
        "gen_decoder": ("vision_gen_dec_model.",),
        "gen_aligners": ("vision_gen_enc_aligner.", "vision_gen_dec_aligner_norm.", "vision_gen_dec_aligner."),
        "repa_head": ("repa_head.",),
    },
}
"""Family -> group -> parameter-name prefixes."""

FREEZE_SCHEDULES: dict[str, dict[int, frozenset[str]]] = {
    # Janus-Pro I: adaptors + image head (LLM, SigLIP, VQ frozen); II: all but SigLIP, VQ; III: + SigLIP.
    "janus_pro": {
        1: frozenset({"und_aligner", "gen_embed", "gen_aligner", "gen_head"}),
        2: frozenset({"llm", "und_aligner", "gen_embed", "gen_aligner", "gen_head"}),
        3: frozenset({"llm", "siglip", "und_aligner", "gen_embed", "gen_aligner", "gen_head"}),
    },
    # JanusFlow I: the randomly initialised parts; II: all but SigLIP; III: + SigLIP. The VAE is outside.
    "janusflow": {
        1: frozenset({"und_aligner", "gen_encoder", "gen_decoder", "gen_aligners", "repa_head"}),
        2: frozenset({"llm", "und_aligner", "gen_encoder", "gen_decoder", "gen_aligners", "repa_head"}),
        3: frozenset({"llm", "siglip", "und_aligner", "gen_encoder", "gen_decoder", "gen_aligners", "repa_head"}),
    },
}
"""Family -> stage (1, 2, 3) -> the groups that train."""

FIXED_GROUPS: dict[str, frozenset[str]] = {"janus_pro": frozenset({"vq"}), "janusflow": frozenset()}
"""Groups no stage may train: Janus-Pro's VQ defines the image-token targets (JanusFlow's VAE is outside the
model)."""


def param_group(family: str, name: str) -> str:
    """The group of parameter ``name``; an unclaimed name is an error."""
    for group, prefixes in PARAM_GROUPS[family].items():
        if name.startswith(prefixes):
            return group
    raise ValueError(f"{family}: parameter {name!r} belongs to no freeze group in PARAM_GROUPS")


def _check(family: str, stage: int) -> None:
    if family not in FREEZE_SCHEDULES:
        raise ValueError(f"unknown family {family!r}; valid: {sorted(FREEZE_SCHEDULES)}")
    if stage not in FREEZE_SCHEDULES[family]:
        raise ValueError(f"unknown stage {stage!r} for {family}; valid: {sorted(FREEZE_SCHEDULES[family])}")


def trained_groups(family: str, stage: int, also_train: Iterable[str] = ()) -> frozenset[str]:
    """The stage's schedule plus ``also_train`` (a recipe's deliberate departure, e.g. a random-init SigLIP
    that the schedule would keep frozen); an unknown or fixed group is an error naming the valid ones."""
    _check(family, stage)
    extra = frozenset(also_train)
    valid = set(PARAM_GROUPS[family]) - FIXED_GROUPS[family]
    if not extra <= valid:
        raise ValueError(
            f"{family}: also_train {sorted(extra - valid)} is not a trainable group; valid: {sorted(valid)}"
        )
    return FREEZE_SCHEDULES[family][stage] | extra


def apply_freeze(
    model: nn.Module, family: str, stage: int, also_train: Iterable[str] = ()
) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` by the stage's schedule (plus ``also_train``, see :func:`trained_groups`); return
    ``{group: {"trainable": n, "total": n}}`` plus a ``"_all"`` entry."""
    train = trained_groups(family, stage, also_train)
    counts: dict[str, dict[str, int]] = {g: {"trainable": 0, "total": 0} for g in PARAM_GROUPS[family]}
    for name, p in model.named_parameters():
        group = param_group(family, name)
        p.requires_grad_(group in train)
        counts[group]["total"] += p.numel()
        counts[group]["trainable"] += p.numel() if group in train else 0
    counts["_all"] = {
        "trainable": sum(c["trainable"] for c in counts.values()),
        "total": sum(c["total"] for c in counts.values()),
    }
    return counts


def format_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """One line per group: ``group  trainable / total`` (for logs and the test printout)."""
    return "\n".join(f"{g:14s} {c['trainable']:>14,d} / {c['total']:>14,d}" for g, c in counts.items())
