"""Connecting to Ray the same way in every stage: a cluster when one is named, else an embedded one."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (a Ray job sets it), else start a local Ray.

    Passing resources to an existing cluster raises in Ray, so they are only given to a local one.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 configure_logging=False)


def wants_gpus(device: str, needed: int = 1) -> bool:
    """Whether Ray work for ``device`` should request GPUs: always for "cuda", for "auto" when the
    cluster has at least ``needed`` GPUs now. Decided from the cluster, not the driver, whose node
    (e.g. a CPU-only head) may have none. An autoscaling cluster whose GPU nodes are not up yet
    counts as none under "auto": say "cuda" to make the work wait for them."""
    import ray

    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) >= needed
