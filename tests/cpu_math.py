"""A module-scoped fixture for tests that run tiny models on the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def fast_cpu_math():
    # Tiny models: one intra-op thread (two threads on a busy 2-core machine spin-wait ~20x slower), and no
    # denormal floats (a model trained to near-zero loss otherwise crawls). Restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
