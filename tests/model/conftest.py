"""Fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch

from model.flavors import get_flavor
from model.tokenizer import build_debug_tokenizer, special_ids


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


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_math():
    # Tiny models: one intra-op thread (two threads on a busy 2-core machine spin-wait ~20x slower), and no
    # denormal floats (a model trained to near-zero loss otherwise crawls). Restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
