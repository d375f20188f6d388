"""The family registry: every family-specific choice behind one spec."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.build import build_model
from model.family import FAMILY_SPECS, family_of, get_family
from model.flavors import FAMILIES, VQConfig, get_flavor


def test_every_family_has_a_spec_and_each_model_finds_its_own() -> None:
    flavor = get_flavor("debug")
    for name in FAMILIES:
        spec = get_family(name)
        model = build_model(flavor, name, device="meta")
        assert family_of(model) is spec and spec.name == name
        assert len(list(spec.llm(model).layers)) == flavor.llm.num_layers
        assert spec.gen_grid(flavor) ** 2 == flavor.num_image_tokens(name)
        assert set().union(*spec.freeze_schedule.values()) <= set(spec.param_groups)
    assert set(FAMILY_SPECS) == set(FAMILIES)
    assert {get_family(n).tokenizer.name for n in FAMILIES} == {"vq", "vae"}


def test_unknown_families_and_models_are_named() -> None:
    with pytest.raises(KeyError, match="unknown model family 'emu'; valid families"):
        get_family("emu")
    with pytest.raises(TypeError, match="Linear is no model of a known family"):
        family_of(torch.nn.Linear(2, 2))


def test_a_flavor_is_checked_by_the_family_that_builds_it() -> None:
    debug = get_flavor("debug")
    odd = dataclasses.replace(debug, vq=VQConfig(base_channels=32, channel_multiplier=[1, 2], image_size=64))
    assert odd.family("janusflow") == "janusflow"  # JanusFlow does not use the VQ grid
    with pytest.raises(ValueError, match="vision grid 8 != vq grid 32"):
        odd.family("janus_pro")
