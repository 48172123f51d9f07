"""The Ray Train job: N DDP workers run ``train_worker``; checkpoints and resume go through Ray
Train's storage (``<run>/dictionaries/<name>/checkpoints/``).

This Ray version (Train V2) resumes by re-running with the same run name and storage path: the
newest reported checkpoint comes back through ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading

import torch

from lexica import storage
from lexica.progress import Progress
from lexica.train.metrics import MetricsLog
from lexica.train.plan import TrainingPlan, new_dictionary
from lexica.train.worker import train_worker

STATE_FILE = "state.pt"


def _worker_entry(values: dict) -> None:
    import ray.train
    import ray.train.torch

    plan: TrainingPlan = values["plan"]
    torch.set_num_threads(max(1, int(plan.config.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            # Our own checkpoint, read tensors-only: weights_only refuses arbitrary pickled objects.
            resume = torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=True)
    metrics_log = MetricsLog(plan, track=True) if rank == 0 else None

    def report(metrics: dict | None, state: dict | None) -> None:
        if metrics and metrics_log is not None:
            metrics_log.add(metrics)
        if state is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_out = None
            if rank == 0:
                torch.save(state, os.path.join(folder, STATE_FILE))
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": state["step"], **(metrics or {})}, checkpoint=checkpoint_out)

    try:
        train_worker(plan, rank, world, device, resume,
                     wrap=lambda module: ray.train.torch.prepare_model(module, move_to_device=False),
                     on_report=report, checkpoint_every=plan.config.checkpoint_every,
                     show_progress=False)  # the driver shows it (MetricsWatcher), not each worker's log
    finally:
        if metrics_log is not None:
            metrics_log.close()


def run_ray_training(plan: TrainingPlan) -> torch.nn.Module:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from lexica.cluster import ensure_ray, wants_gpus

    ensure_ray()
    use_gpu = wants_gpus(plan.config.device, needed=plan.config.workers)
    fs, folder = storage.url_to_fs(plan.folder, plan.config.storage_options)
    trainer = TorchTrainer(
        _worker_entry, train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=plan.config.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": plan.config.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="checkpoints", storage_path=folder,
                                       storage_filesystem=_pyarrow_filesystem(fs),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    with MetricsWatcher(plan):
        result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as checkpoint_folder:
        state = torch.load(os.path.join(checkpoint_folder, STATE_FILE), map_location="cpu", weights_only=True)

    dictionary = new_dictionary(plan, "cpu")
    dictionary.load_state_dict(state["dictionary"])
    return dictionary


class MetricsWatcher:
    """The job's progress, shown by the driver: rank 0 rewrites metrics.jsonl every ``log_every``
    steps, and a thread here turns its last line into the stage's one progress bar (or log lines)."""

    def __init__(self, plan: TrainingPlan, poll_seconds: float = 1.0):
        self.plan, self.poll_seconds = plan, poll_seconds
        self.fs, folder = storage.url_to_fs(plan.folder, plan.config.storage_options)
        self.path = storage.join(folder, "metrics.jsonl")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="lexica-train-progress", daemon=True)
        self.progress = Progress("train", plan.total_steps, "steps", interval=5.0)
        self.shown_step = -1

    def __enter__(self) -> MetricsWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        self._show(final=exc_info[0] is None)

    def _watch(self) -> None:
        while not self.stop.wait(self.poll_seconds):
            self._show(final=False)

    def _show(self, final: bool) -> None:
        try:
            with self.fs.open(self.path, "rb") as handle:
                lines = handle.read().decode().splitlines()
            metrics = json.loads(lines[-1]) if lines else None
        except (FileNotFoundError, ValueError, OSError):  # not written yet, or mid-replacement
            metrics = None
        if metrics is None or (not final and (metrics["step"] <= self.shown_step
                                               or metrics["step"] >= self.plan.total_steps)):
            return  # nothing new; the last step is shown once, by the final update
        self.shown_step = metrics["step"]
        self.progress.update(metrics["step"], metrics["tokens"],
                             f"fvu {metrics.get('fvu', float('nan')):.3f}  dead {metrics.get('dead_fraction', 0):.1%}",
                             final=final and metrics["step"] >= self.plan.total_steps)


def _pyarrow_filesystem(fs):
    if storage.is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
