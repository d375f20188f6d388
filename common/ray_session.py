"""One way for every job to get a Ray instance: join the running one or start a local one, and stop only that."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def ray_session(num_cpus: int = 0, *, log_to_driver: bool = False, **init_kwargs: Any) -> Iterator[bool]:
    """Join the Ray a job runs in (already initialised in this process, ``RAY_ADDRESS``, ``ray job submit``) or
    start a local instance with ``num_cpus`` CPUs (0 = all of this machine's) and no dashboard.

    Yields whether this call started Ray; only then does it shut Ray down on exit, so a job never ends an
    instance it joined (the demo's, a test's, a cluster's).
    """
    import ray

    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=log_to_driver, **init_kwargs)
        else:
            ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=log_to_driver, **init_kwargs)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
