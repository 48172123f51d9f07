"""The Ray Train job: N DDP workers run ``train_worker``; checkpoints and resume go through Ray
Train's storage (``<run>/dictionaries/<name>/checkpoints/``, or a sweep's
``<run>/sweeps/<sweep>/checkpoints/`` with one ``<name>/state.pt`` per dictionary).

This Ray version (Train V2) resumes by re-running with the same run name and storage path: the
newest reported checkpoint comes back through ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lexica import storage
from lexica.errors import ConfigError
from lexica.progress import Progress
from lexica.train.metrics import MetricsLog
from lexica.train.plan import TrainingPlan, new_dictionary
from lexica.train.shard import Shard
from lexica.train.worker import train_worker

STATE_FILE = "state.pt"


def state_file(shard: int = 0, shards: int = 1) -> str:
    """The file of one dictionary's state: ``state.pt``, or a shard's ``shard-<i>-of-<S>.pt``."""
    return STATE_FILE if shards == 1 else f"shard-{shard}-of-{shards}.pt"


def state_path(folder: str, plans: list[TrainingPlan], index: int, shard: int = 0) -> str:
    """A dictionary's state inside a checkpoint: ``state.pt`` (or one file per shard), inside
    ``<name>/`` in a sweep's."""
    name = state_file(shard, plans[0].config.shards)
    if len(plans) == 1:
        return os.path.join(folder, name)
    return os.path.join(folder, plans[index].name, name)


def check_resumable(fs, folder: str, plans: list[TrainingPlan]) -> None:
    """Refuse, before any worker starts rather than deep inside one, to resume from a newest
    checkpoint written with another number of shards, or a sweep's that lacks one of its
    dictionaries (its variants changed under the same name)."""
    checkpoints = sorted(path for path in fs.glob(storage.join(folder, "checkpoints", "checkpoint_*"))
                         if fs.isdir(path))  # not Ray's checkpoint_manager_snapshot.json beside them
    if not checkpoints:
        return
    newest = checkpoints[-1]
    shards = plans[0].config.shards
    first = storage.join(newest, *([plans[0].name] if len(plans) > 1 else []))
    if fs.exists(first) and not fs.exists(storage.join(first, state_file(0, shards))):
        written = sorted(storage.list_names(fs, first))
        found = next((name for name in written if name.startswith("shard-") or name == STATE_FILE), None)
        was = 1 if found == STATE_FILE else int(found.rsplit("-", 1)[-1].split(".")[0]) if found else None
        if was is not None:
            raise ConfigError(f"the newest checkpoint {newest} was written with train.shards = {was}, this job has "
                              f"{shards}; resume with --shards {was} (a checkpoint is not resharded), or train "
                              "afresh under another name")
    if len(plans) == 1:
        return
    missing = [plan.name for plan in plans if not fs.exists(storage.join(newest, plan.name, state_file(0, shards)))]
    if missing:
        raise ConfigError(f"the sweep's checkpoint {newest} holds no state for {', '.join(missing)}: its variants "
                          "changed since it was written; name the new sweep differently (train.name) or restore "
                          "its variants to resume it")


def _worker_entry(values: dict) -> None:
    import ray.train
    import ray.train.torch

    plans: list[TrainingPlan] = values["plans"]
    torch.set_num_threads(max(1, int(plans[0].config.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    shards = plans[0].config.shards
    shard = rank % shards  # the slice of the latents this rank holds (see train/shard.py)
    device = ray.train.torch.get_device()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            # Our own checkpoint, read tensors-only: weights_only refuses arbitrary pickled objects.
            resume = [torch.load(state_path(folder, plans, index, shard), map_location=device, weights_only=True)
                      for index in range(len(plans))]
    metrics_logs = [MetricsLog(plan, track=True) for plan in plans] if rank == 0 else []

    def report(metrics_lines: list[dict | None], states: list[dict | None]) -> None:
        for metrics_log, metrics in zip(metrics_logs, metrics_lines, strict=False):  # rank 0 alone logs
            if metrics:
                metrics_log.add(metrics)
        if states[0] is None:
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_out = None
            if rank < shards:  # the first copy: one file per shard, merged into one checkpoint by Ray Train
                for index, state in enumerate(states):
                    path = state_path(folder, plans, index, shard)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    torch.save(state, path)
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"step": states[0]["step"], **(metrics_lines[0] or {})}, checkpoint=checkpoint_out)

    try:
        train_worker(plans, rank, world, device, resume,
                     wrap=lambda module: ray.train.torch.prepare_model(module, move_to_device=False),
                     on_report=report, checkpoints=True,
                     show_progress=False)  # the driver shows it (MetricsWatcher), not each worker's log
    finally:
        for metrics_log in metrics_logs:
            metrics_log.close()


def run_ray_training(plans: list[TrainingPlan], folder_url: str) -> list[torch.nn.Module]:
    """Train the job's dictionaries as one Ray Train job whose checkpoints go to ``folder_url``
    (the dictionary's folder, or the sweep's)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from lexica.cluster import ensure_ray, wants_gpus

    ensure_ray()
    config = plans[0].config
    use_gpu = wants_gpus(config.device, needed=config.workers)
    fs, folder = storage.url_to_fs(folder_url, config.storage_options)
    check_resumable(fs, folder, plans)
    trainer = TorchTrainer(
        _worker_entry, train_loop_config={"plans": plans},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="checkpoints", storage_path=folder,
                                       storage_filesystem=_pyarrow_filesystem(fs),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    with MetricsWatcher(plans):
        result = trainer.fit()
    if result.error:
        raise result.error
    if config.shards > 1:  # left in the checkpoint: the export reads one shard at a time
        return [ShardedDictionary(plan, result.checkpoint, [os.path.relpath(state_path("", plans, index, shard))
                                                            for shard in range(config.shards)])
                for index, plan in enumerate(plans)]
    dictionaries = []
    with result.checkpoint.as_directory() as checkpoint_folder:
        for index, plan in enumerate(plans):
            state = torch.load(state_path(checkpoint_folder, plans, index), map_location="cpu", weights_only=True)
            dictionary = new_dictionary(plan, "cpu")
            dictionary.load_state_dict(state["dictionary"])
            dictionaries.append(dictionary)
    return dictionaries


@dataclass
class ShardedDictionary:
    """A sharded job's trained dictionary, still in its final checkpoint: one state file per shard."""

    plan: TrainingPlan
    checkpoint: object  # ray.train.Checkpoint
    paths: list[str]  # in shard order, relative to the checkpoint's folder

    def shards(self, folder: str) -> Iterator[torch.nn.Module]:
        """Each shard's dictionary in turn (its state file read memory-mapped, weights only)."""
        for index, path in enumerate(self.paths):
            dictionary = new_dictionary(self.plan, "cpu", Shard(index, len(self.paths), self.plan.d_sae))
            state = torch.load(os.path.join(folder, path), map_location="cpu", weights_only=True, mmap=True)
            dictionary.load_state_dict(state["dictionary"])
            yield dictionary


class MetricsWatcher:
    """The job's progress, shown by the driver: rank 0 rewrites metrics.jsonl every ``log_every``
    steps, and a thread here turns the last line of the first dictionary's into the stage's one
    progress bar (or log lines)."""

    def __init__(self, plans: list[TrainingPlan], poll_seconds: float = 1.0):
        plan = plans[0]
        self.plan, self.poll_seconds = plan, poll_seconds
        self.others = len(plans) - 1
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
                             f"fvu {metrics.get('fvu', float('nan')):.3f}  dead {metrics.get('dead_fraction', 0):.1%}"
                             + (f"  ({self.plan.name}; {self.others} more in this sweep)" if self.others else ""),
                             final=final and metrics["step"] >= self.plan.total_steps)


def _pyarrow_filesystem(fs):
    if storage.is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
