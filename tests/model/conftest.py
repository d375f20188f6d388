"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch

from model.flavors import get_flavor
from model.tokenizer import build_debug_tokenizer, special_ids
from tests.cpu_math import fast_cpu_math  # noqa: F401 - autouse, module scope


@pytest.fixture(scope="session")
def debug_flavor():
    return get_flavor("debug")


@pytest.fixture(scope="session")
def tokenizer():
    return build_debug_tokenizer()


@pytest.fixture(scope="session")
def special(tokenizer):
    return special_ids(tokenizer)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
