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
