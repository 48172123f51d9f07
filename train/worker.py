"""The per-worker training loop: rank r of N reads its own data lanes, which make up its slice of
every global batch, so N workers see exactly the batches one worker reading all lanes would. A job
trains one dictionary or a sweep's many: each batch is read once and stepped by every one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lexica.progress import Progress
from lexica.store import ActivationStore
from lexica.train.data import Prefetcher, ReadCount, shuffled_batches
from lexica.train.memory import retain_freed_memory
from lexica.train.optimizers import evaluation_weights, new_optimizer, training_weights
from lexica.train.plan import TrainingPlan, new_dictionary
from lexica.train.resample import resample_dead
from lexica.train.shard import Shard, new_shard, of_width, total, whole
from lexica.train.step import FiringTracker, learning_rate, train_step


@dataclass
class Member:
    """One dictionary of the job and everything its steps change: weights, optimiser, firing
    tracker, resampling count."""

    plan: TrainingPlan
    dictionary: torch.nn.Module
    model: torch.nn.Module  # the dictionary, wrapped for DDP when there are several workers
    optimizer: torch.optim.Optimizer
    tracker: FiringTracker
    resampled: int = 0

    @property
    def shard(self) -> Shard:
        return self.dictionary.shard

    def state(self, step: int) -> dict:
        """What a checkpoint holds of this dictionary (of a shard: its slice, and which it is)."""
        return {"step": step, "dictionary": self.dictionary.state_dict(), "optimizer": self.optimizer.state_dict(),
                "tokens_since_fired": self.tracker.tokens_since_fired.clone(), "resampled": self.resampled,
                "shard": torch.tensor([self.shard.index, self.shard.count])}


def new_member(plan: TrainingPlan, first_batch: Callable[[], torch.Tensor], device, resume: dict | None,
               wrap: Callable[[torch.nn.Module], torch.nn.Module] | None, shard: Shard | None = None) -> Member:
    """A dictionary (``shard``'s slice of it) initialised from the job's first global batch, or
    restored from ``resume``."""
    config = plan.config
    dictionary = new_dictionary(plan, device, of_width(shard, plan.d_sae) if shard else whole(plan.d_sae))
    tracker = FiringTracker.create(dictionary.d_sae, device)
    if resume:
        dictionary.load_state_dict(resume["dictionary"])
        tracker.tokens_since_fired.copy_(resume["tokens_since_fired"])
    else:
        dictionary.initialise_from(first_batch())
    # Made after the weights are final: schedule-free averaging starts from a copy of them.
    optimizer = new_optimizer(dictionary, plan.peak_lr, config.optimizer, config.schedule, config.momentum)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        if resume["step"] < plan.total_steps:
            training_weights(optimizer)  # a finished run's state holds the averaged weights
    wrapped = wrap(dictionary) if wrap and not dictionary.shard.sharded else dictionary  # shards average themselves
    return Member(plan, dictionary, wrapped, optimizer, tracker, resume.get("resampled", 0) if resume else 0)


def member_step(member: Member, step: int, batch: torch.Tensor):
    """One optimiser step of one dictionary on the shared batch; returns the step's output and the
    dead fraction it trained with."""
    plan, config = member.plan, member.plan.config
    # Schedule-free averaging replaces the decay: its averaged weights are what a decay would reach.
    decay_fraction = 0.0 if config.schedule == "schedule-free" else config.lr_decay_fraction
    for group in member.optimizer.param_groups:
        group["lr"] = learning_rate(step, plan.total_steps, plan.peak_lr, plan.warmup_steps, decay_fraction)
    member.dictionary.begin_step(step, plan.total_steps)
    tracker = member.tracker
    dead_mask = tracker.tokens_since_fired >= plan.dead_tokens
    output = train_step(member.model, member.optimizer, batch, dead_mask if dead_mask.any() else None, plan.variance)
    shard = member.shard
    tracker.update(output.fired, tokens=config.batch_size, group=shard.replicas if shard.sharded else None)
    done = step + 1
    if config.resample_every and done % config.resample_every == 0 and done < plan.total_steps:
        # Seeded by the step, so a resumed run resamples exactly as an uninterrupted one.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + done)
        revived = resample_dead(member.dictionary, member.optimizer, batch,
                                tracker.tokens_since_fired >= plan.dead_tokens, generator)
        tracker.tokens_since_fired[revived] = 0
        member.resampled += len(revived)
    if done == plan.total_steps:
        evaluation_weights(member.optimizer)  # the last state holds the weights to export
    return output, float(total(dead_mask.sum(), shard)) / plan.d_sae


def member_metrics(member: Member, done: int, output, dead_fraction: float, timing: dict) -> dict:
    """The dictionary's metrics line after ``done`` steps; starts its next firing window."""
    tracker = member.tracker
    frequencies = tracker.window_counts.float() / max(tracker.window_tokens, 1)
    metrics = {"step": done, "tokens": done * member.plan.config.batch_size, "loss": float(output.loss.detach()),
               **output.terms, "dead_fraction": dead_fraction, "resampled": member.resampled,
               "dense_fraction": float(total((frequencies > 0.1).sum(), member.shard)) / member.plan.d_sae,
               "lr": member.optimizer.param_groups[0]["lr"], **timing}
    tracker.reset_window()
    return metrics


def job_total(value: int) -> int:
    """``value`` summed over the job's workers (itself with one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total)
    return int(total.item())


def train_worker(plans: list[TrainingPlan], rank: int = 0, world: int = 1, device="cpu",
                 resume: list[dict] | None = None, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 on_report: Callable[[list[dict | None], list[dict | None]], None] | None = None,
                 checkpoints: bool = False, show_progress: bool = True) -> list[torch.nn.Module]:
    """Train the job's dictionaries (one, or a sweep's) on this worker's slice of every global
    batch, each batch read once and given to every dictionary; returns the (unwrapped) dictionaries.

    ``on_report(metrics, states)`` receives, per dictionary, its metric lines and, every
    ``checkpoint_every`` steps (when ``checkpoints``) and at the end, its full training state.
    """
    config = plans[0].config  # the data stream's knobs are shared by every plan of a job
    total_steps = plans[0].total_steps
    retain_freed_memory()  # the step's temporaries are reused, not page-faulted in afresh
    store = ActivationStore(plans[0].store_url, config.storage_options)
    lanes = config.lanes()
    # The shards of one copy of the dictionaries read the same rows: the lanes are split among copies.
    shard = new_shard(rank, world, config.shards) if world > 1 else None
    copies, copy = world // config.shards, rank // config.shards
    per_copy = lanes // copies  # this copy's lanes: its slice of every global batch
    scale, data_seed = plans[0].batch_scale(device), plans[0].data_seed
    target = ActivationStore(plans[0].target_url, config.storage_options) if plans[0].target_url else None
    first: list[torch.Tensor] = []
    read_count = ReadCount()  # what this worker read of the store (the first batch included)

    def first_batch() -> torch.Tensor:  # the whole global batch: every worker starts the same
        if not first:
            first.append(next(shuffled_batches(store, config.batch_size, config.buffer_rows, data_seed, scale, device,
                                               lanes=lanes, read_count=read_count, target=target)))
        return first[0]

    members = [new_member(plan, first_batch, device, resume[index] if resume else None, wrap, shard)
               for index, plan in enumerate(plans)]
    first.clear()
    start_step = resume[0]["step"] if resume else 0
    progress = Progress("train", total_steps, "steps", interval=5.0)
    # Started only now, right before the try that closes it: nothing above can leave its thread running.
    batches = Prefetcher(shuffled_batches(store, config.batch_size, config.buffer_rows, data_seed, scale, device,
                                          skip_batches=start_step, lanes=lanes,
                                          lane_ids=list(range(copy * per_copy, (copy + 1) * per_copy)),
                                          read_count=read_count, target=target))
    started = window_started = time.monotonic()
    window_waited = 0.0
    try:
        for step in range(start_step, total_steps):
            batch = next(batches)
            results = [member_step(member, step, batch) for member in members]
            done = step + 1
            metrics_lines: list[dict | None] = [None] * len(members)
            if done % config.log_every == 0 or done == total_steps:
                now = time.monotonic()
                timing = {"tokens_per_second": (done - start_step) * config.batch_size / (now - started),
                          # Time the loop sat waiting for data; the prefetch thread should keep it near 0.
                          "data_wait_fraction": (batches.waited - window_waited) / (now - window_started),
                          "store_bytes_read": job_total(read_count.bytes)}
                metrics_lines = [member_metrics(member, done, output, dead, timing)
                                 for member, (output, dead) in zip(members, results, strict=True)]
                window_started, window_waited = time.monotonic(), batches.waited
            states: list[dict | None] = [None] * len(members)
            if done == total_steps or (checkpoints and config.checkpoint_every and done % config.checkpoint_every == 0):
                states = [member.state(done) for member in members]
            if on_report and (metrics_lines[0] or states[0]):
                on_report(metrics_lines, states)
            if rank == 0 and show_progress:
                shown = "  ".join(f"fvu {output.terms['fvu']:.3f} dead {dead:.1%}" for output, dead in results[:4])
                progress.update(done, done * config.batch_size, shown + ("  ..." if len(results) > 4 else ""),
                                final=done == total_steps)
    finally:
        batches.close()
    return [member.dictionary for member in members]
