"""Checks, before any stage runs, that every node of the Ray cluster can write and read the storage root: credentials
are checked where they are used, and a node that cannot is named."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gan import storage

PROBE_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0, max_retries=0)
def _probe_node(root: str, marker: str) -> str | None:
    """On one node: an object of this node's must go in and come back out, and the driver's marker must be
    visible (a local path on several nodes is not shared storage). Returns what failed, or None."""
    try:
        storage.probe(root, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if not storage.is_file(marker):
            return (f"does not see {marker}, which the driver wrote: {root} is not storage every node shares; "
                    f"give --storage a bucket URI (s3://..., gs://...) or a volume mounted at the same path on every "
                    f"node")
    except OSError as err:
        return str(err)
    return None


def check_storage(root: str, *, log: Callable[[str], None] = print) -> None:
    """Probes `root` from the driver, then from every alive node of the connected Ray cluster; raises
    storage.StorageError naming the URI, each node that failed and why."""
    storage.probe(root, f"driver-{socket.gethostname()}-{os.getpid()}")
    marker = storage.join(root, ".probe", f"pipeline-{uuid.uuid4().hex}")
    storage.write_bytes(marker, b"written by the pipeline's driver\n")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    try:
        refs = {n["NodeID"]: _probe_node.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            name="storage-probe").remote(root, marker) for n in nodes}
        failures = []
        for node in nodes:
            try:
                error = ray.get(refs[node["NodeID"]], timeout=PROBE_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as err:
                error = f"the probe task did not finish: {err}"
            if error:
                failures.append(f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']}): {error}")
    finally:
        storage.delete(marker)
    if failures:
        raise storage.StorageError(f"storage {root} is not usable from every node of the Ray cluster: "
                                   + "; ".join(failures))
    log(f"[pipeline] storage {root}: written and read back from the driver and {len(nodes)} node(s)")
