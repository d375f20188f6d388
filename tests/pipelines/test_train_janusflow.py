"""JanusFlow's three-stage training on a local Ray instance (the checks of test_train.py's Janus-Pro run): in a
module of its own so that parallel test workers train the two families side by side."""

from __future__ import annotations

import pytest

from tests.pipelines.train_fixtures import check_three_stages, ray_local, stage_data, three_stages  # noqa: F401

pytestmark = pytest.mark.ray


def test_three_stages_freeze_and_mlflow(three_stages) -> None:  # noqa: F811
    check_three_stages("janusflow", three_stages)
