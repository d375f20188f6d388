"""Flavor registry, real-size parameter counts (meta device) and the freeze schedules."""

from __future__ import annotations

import pytest

from model.build import build_model
from model.flavors import FLAVORS, get_flavor
from model.freeze import FREEZE_SCHEDULES, PARAM_GROUPS, apply_freeze, format_counts, trained_groups


def test_unknown_flavor_lists_valid_names():
    with pytest.raises(KeyError, match="janus_pro_1b"):
        get_flavor("janus_pro_2b")
    with pytest.raises(ValueError, match="builds"):
        get_flavor("janus_pro_1b").family("janusflow")


def test_get_flavor_returns_a_copy():
    f = get_flavor("debug")
    f.llm.hidden_size = 1
    assert FLAVORS["debug"].llm.hidden_size == 128


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def real_models():
    return {name: build_model(get_flavor(name), device="meta") for name in FLAVORS if name != "debug"}


def test_real_parameter_counts_match_the_papers(real_models):
    pro1, pro7, flow = real_models["janus_pro_1b"], real_models["janus_pro_7b"], real_models["janusflow_1_3b"]
    counts = {
        "janus_pro_1b": _count(pro1),
        "janus_pro_7b": _count(pro7),
        "janusflow_1_3b": _count(flow),
        "janus_pro_1b LLM (no embeddings)": _count(pro1.model.language_model.layers),
        "janus_pro_7b LLM (no embeddings)": _count(pro7.model.language_model.layers),
        "SigLIP-L": _count(pro1.model.vision_model),
        "VQ-16": _count(pro1.model.vqmodel),
        "JanusFlow gen encoder+decoder": _count(flow.vision_gen_enc_model) + _count(flow.vision_gen_dec_model),
    }
    for name, n in counts.items():
        print(f"{name:34s} {n / 1e6:10.1f} M")
    # Janus-Pro-1B (HF card 2.09B; "1.5B" LLM), Janus-Pro-7B (7.42B), JanusFlow-1.3B (~2.05B on disk)
    assert 2.0e9 < counts["janus_pro_1b"] < 2.15e9
    assert 7.3e9 < counts["janus_pro_7b"] < 7.5e9
    assert 1.95e9 < counts["janusflow_1_3b"] < 2.15e9
    assert 1.2e9 < counts["janus_pro_1b LLM (no embeddings)"] < 1.3e9
    assert 290e6 < counts["SigLIP-L"] < 320e6
    assert 65e6 < counts["JanusFlow gen encoder+decoder"] < 75e6  # "about 70M"


@pytest.mark.parametrize("family", ["janus_pro", "janusflow"])
def test_freeze_schedules_debug_and_real(family, real_models):
    real = next(real_models[name] for name in real_models if get_flavor(name).families == (family,))
    debug = build_model(get_flavor("debug"), family)
    for name, model in (("debug", debug), ("real", real)):
        for stage, train in FREEZE_SCHEDULES[family].items():
            counts = apply_freeze(model, family, stage)
            print(f"\n{family} {name} stage {stage}\n{format_counts(counts)}")
            for group in PARAM_GROUPS[family]:
                c = counts[group]
                assert c["total"] > 0, group
                assert c["trainable"] == (c["total"] if group in train else 0), (stage, group)
            assert counts["_all"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the tables of JANUS_SPEC
    s = FREEZE_SCHEDULES[family]
    assert "llm" not in s[1] and "siglip" not in s[1] and "siglip" not in s[2] and {"llm", "siglip"} <= s[3]
    assert "vq" not in set().union(*s.values())


def test_unclaimed_parameter_is_an_error():
    import torch

    model = build_model(get_flavor("debug"), "janusflow")
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra"):
        apply_freeze(model, "janusflow", 1)


def test_also_train_adds_groups_to_a_stage_and_refuses_fixed_or_unknown_ones():
    model = build_model(get_flavor("debug"), "janus_pro")
    counts = apply_freeze(model, "janus_pro", 2, also_train=["siglip"])
    assert counts["siglip"]["trainable"] == counts["siglip"]["total"] > 0  # the schedule keeps it frozen in II
    assert counts["vq"]["trainable"] == 0
    assert trained_groups("janus_pro", 2, ["siglip"]) == FREEZE_SCHEDULES["janus_pro"][2] | {"siglip"}
    with pytest.raises(ValueError, match=r"\['vq'\] is not a trainable group"):
        trained_groups("janus_pro", 2, ["vq"])  # the VQ defines the image-token targets
    with pytest.raises(ValueError, match="gen_encoder"):
        trained_groups("janus_pro", 2, ["gen_encoder"])  # a JanusFlow group
