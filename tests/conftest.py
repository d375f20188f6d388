"""Suite-wide collection order: the longest modules first.

`make test` runs the suite on two pytest-xdist workers, one test module per worker at a time (``--dist
loadfile``, so a module's fixtures are built once). A worker that draws a two-minute module last keeps the run
going alone; starting with the longest (measured on 2 cores, longest first) lets the short ones fill in behind
them. Only the order changes: every test still runs, and a run without xdist runs the same tests."""

from __future__ import annotations

import pytest

LONGEST_FIRST = (
    "tests/pipelines/test_train.py",
    "tests/pipelines/test_train_janusflow.py",
    "tests/pipelines/test_demo.py",
    "tests/pipelines/test_cluster.py",
    "tests/benchmarks/test_vq_colour.py",
    "tests/pipelines/test_train_submit.py",
    "tests/pipelines/test_train_step.py",
    "tests/model/test_fit_tokenizers.py",
    "tests/pipelines/test_curate_models.py",
    "tests/pipelines/test_curate.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(rank))

    items.sort(key=key)  # stable: within a module, and among the rest, collection order is kept
