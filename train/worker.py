"""The per-worker training loop: rank r of N reads its own data lanes, which make up its slice of
every global batch, so N workers see exactly the batches one worker reading all lanes would."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lexica.progress import Progress
from lexica.store import ActivationStore
from lexica.train.data import Prefetcher, shuffled_batches
from lexica.train.memory import retain_freed_memory
from lexica.train.optimizers import evaluation_weights, new_optimizer, training_weights
from lexica.train.plan import TrainingPlan, new_dictionary
from lexica.train.resample import resample_dead
from lexica.train.step import FiringTracker, learning_rate, train_step


def train_worker(plan: TrainingPlan, rank: int = 0, world: int = 1, device="cpu", resume: dict | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 on_report: Callable[[dict, dict | None], None] | None = None, checkpoint_every: int = 0,
                 show_progress: bool = True):
    """Train on this worker's slice of every global batch; returns the (unwrapped) dictionary.

    ``on_report(metrics, state_or_None)`` receives metric lines and, every ``checkpoint_every``
    steps and at the end, the full training state for a checkpoint.
    """
    config = plan.config
    retain_freed_memory()  # the step's temporaries are reused, not page-faulted in afresh
    store = ActivationStore(plan.store_url, config.storage_options)
    dictionary = new_dictionary(plan, device)
    lanes = config.lanes()
    per_worker = lanes // world  # this worker's lanes: its slice of every global batch, read by it alone
    tracker = FiringTracker.create(plan.d_sae, device)
    start_step = 0
    if resume:
        dictionary.load_state_dict(resume["dictionary"])
        tracker.tokens_since_fired.copy_(resume["tokens_since_fired"])
        start_step = resume["step"]
    else:
        first = next(shuffled_batches(store, config.batch_size, config.buffer_rows, config.seed, plan.scale, device,
                                      lanes=lanes))  # the whole global batch: every worker starts the same
        dictionary.initialise_from(first)
    # Made after the weights are final: schedule-free averaging starts from a copy of them.
    optimizer = new_optimizer(dictionary, plan.peak_lr, config.optimizer, config.schedule, config.momentum)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        if start_step < plan.total_steps:
            training_weights(optimizer)  # a finished run's state holds the averaged weights
    model = wrap(dictionary) if wrap else dictionary
    progress = Progress("train", plan.total_steps, "steps", interval=5.0)
    # Started only now, right before the try that closes it: nothing above can leave its thread running.
    batches = Prefetcher(shuffled_batches(store, config.batch_size, config.buffer_rows, config.seed, plan.scale,
                                          device, skip_batches=resume["step"] if resume else 0, lanes=lanes,
                                          lane_ids=list(range(rank * per_worker, (rank + 1) * per_worker))))
    # Schedule-free averaging replaces the decay: its averaged weights are what a decay would reach.
    decay_fraction = 0.0 if config.schedule == "schedule-free" else config.lr_decay_fraction
    resampled = resume.get("resampled", 0) if resume else 0
    started = window_started = time.monotonic()
    window_waited = 0.0
    try:
        for step in range(start_step, plan.total_steps):
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, plan.total_steps, plan.peak_lr, plan.warmup_steps, decay_fraction)
            dictionary.begin_step(step, plan.total_steps)
            dead_mask = tracker.tokens_since_fired >= plan.dead_tokens
            output = train_step(model, optimizer, batch, dead_mask if dead_mask.any() else None, plan.variance)
            tracker.update(output.fired, tokens=config.batch_size)
            done = step + 1
            if config.resample_every and done % config.resample_every == 0 and done < plan.total_steps:
                # Seeded by the step, so a resumed run resamples exactly as an uninterrupted one.
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + done)
                revived = resample_dead(dictionary, optimizer, batch, tracker.tokens_since_fired >= plan.dead_tokens,
                                        generator)
                tracker.tokens_since_fired[revived] = 0
                resampled += len(revived)
            metrics = None
            if done % config.log_every == 0 or done == plan.total_steps:
                frequencies = tracker.window_counts.float() / max(tracker.window_tokens, 1)
                metrics = {"step": done, "tokens": done * config.batch_size, "loss": float(output.loss.detach()),
                           **output.terms,
                           "dead_fraction": float(dead_mask.float().mean()), "resampled": resampled,
                           "dense_fraction": float((frequencies > 0.1).float().mean()),
                           "lr": optimizer.param_groups[0]["lr"],
                           "tokens_per_second": (done - start_step) * config.batch_size / (time.monotonic() - started),
                           # Time the loop sat waiting for data; the prefetch thread should keep it near 0.
                           "data_wait_fraction": (batches.waited - window_waited) / (time.monotonic() - window_started)}
                tracker.reset_window()
                window_started, window_waited = time.monotonic(), batches.waited
            state = None
            if done == plan.total_steps:
                evaluation_weights(optimizer)  # the last state holds the weights to export
            if done == plan.total_steps or (checkpoint_every and done % checkpoint_every == 0):
                state = {"step": done, "dictionary": dictionary.state_dict(), "optimizer": optimizer.state_dict(),
                         "tokens_since_fired": tracker.tokens_since_fired.clone(), "resampled": resampled}
            if on_report and (metrics or state):
                on_report(metrics, state)
            if rank == 0 and show_progress:
                progress.update(done, done * config.batch_size,
                                f"fvu {output.terms['fvu']:.3f}  dead {float(dead_mask.float().mean()):.1%}",
                                final=done == plan.total_steps)
    finally:
        batches.close()
    return dictionary
