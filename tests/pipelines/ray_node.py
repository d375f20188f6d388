"""Start one Ray worker node that listens on 127.0.0.1 only, joined to a head, and block until SIGTERM.

    python tests/pipelines/ray_node.py '{"gcs": "127.0.0.1:PORT", "num_cpus": 1, "resources": {...}, ...}'

`ray start --address=...` cannot do this on Linux: it swaps 127.0.0.1 for the machine's address (and binds
every interface), and with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps the head on 127.0.0.1) it
refuses to start a second node. So the node is started the way ray.cluster_utils starts one, with the node
address given as is. On SIGTERM Ray's own handler stops every process this node started.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec: dict) -> None:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=spec["gcs"],
        node_ip_address="127.0.0.1",
        num_cpus=spec["num_cpus"],
        resources=spec["resources"],
        object_store_memory=spec["object_store_memory"],
        temp_dir=spec["temp_dir"],
        node_manager_port=0,
        min_worker_port=0,
        max_worker_port=0,
        dashboard_agent_listen_port=spec["agent_port"],
        metrics_export_port=spec["metrics_port"],
        runtime_env_agent_port=spec["runtime_env_port"],
        include_log_monitor=False,
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node {node.node_id} up", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
