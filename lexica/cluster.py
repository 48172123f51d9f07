"""Connecting to Ray the same way in every stage: a cluster when one is named, else an embedded one."""

from __future__ import annotations

import os

from lexica.command import verbose


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or ``RAY_ADDRESS`` (a Ray job sets it), else start a local Ray.

    Passing resources to an existing cluster raises in Ray, so they are only given to a local one.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_ray()
    # Workers' own output (Ray Train's internal actors, library warnings) reaches the user only with
    # --verbose: Lexica's progress and errors come through the driver, and workers' logs stay in
    # Ray's log folder (/tmp/ray/session_latest/logs) either way.
    forward = verbose()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=forward)
    else:
        # Ray starts its workers at nice 15 so that its own daemons stay responsive; on a machine
        # whose cores the work fills, that lets every other process preempt the harvest's (or
        # training's) thread team mid-step: the pool ran at 0.80-0.93 of in-process at nice 15 and
        # at 1.03-1.09 at nice 0 (bench/README.md). A cluster's own `ray start` decides for itself.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=forward,
                 configure_logging=False)
    quiet_ray()


def quiet_ray() -> None:
    """Keep Ray's informational messages (start-up, token authentication, Train's run summary) out
    of the user's output unless ``--verbose``: Ray configures its loggers when imported, so this is
    applied after the import (and again after ``ray.init``)."""
    if verbose():
        return
    import logging

    for name in ("ray", "ray.train", "ray.data", "ray.tune", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray warns on every start that token authentication is on, its secure default, which we keep.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def wants_gpus(device: str, needed: int = 1) -> bool:
    """Whether Ray work for ``device`` should request GPUs: always for "cuda", for "auto" when the
    cluster has at least ``needed`` GPUs now. Decided from the cluster, not the driver, whose node
    (e.g. a CPU-only head) may have none. An autoscaling cluster whose GPU nodes are not up yet
    counts as none under "auto": say "cuda" to make the work wait for them."""
    import ray

    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) >= needed


def local_resources() -> dict[str, float]:
    """This machine's CPUs and GPUs: what an embedded Ray gets, and what ``--help`` reports."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_resources(address: str | None = None) -> dict[str, float]:
    """The Ray cluster's CPUs and GPUs (connecting to it, or starting the embedded one)."""
    import ray

    ensure_ray(address)
    totals = ray.cluster_resources()
    return {"CPU": float(totals.get("CPU", 1)), "GPU": float(totals.get("GPU", 0))}


def gpu_count(resources: dict[str, float], device: str) -> int:
    """GPUs that work for ``device`` may use: none for "cpu", whole GPUs otherwise."""
    return 0 if device == "cpu" else int(resources.get("GPU", 0))


def node_resources() -> list[dict[str, float]]:
    """CPUs and GPUs of each alive node of the connected Ray cluster."""
    import ray

    return [{"CPU": float(node["Resources"].get("CPU", 0)), "GPU": float(node["Resources"].get("GPU", 0))}
            for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) > 0]
