"""The training loop: a plan every worker shares, the per-worker loop, and ``fit``.

``train_step`` is a small, testable function. ``train_worker`` runs the whole loop on one worker
(rank r of N reads its own data lanes, which make up its slice of every global batch, so N workers
see exactly the batches one worker reading all lanes would); ``fit`` runs it in-process
(``workers: 0``) or as a Ray Train job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harvest import storage
from harvest.config import ConfigError
from harvest.progress import Progress
from harvest.store import ActivationStore, store_url
from train.architectures import build
from train.config import TrainConfig
from train.data import Prefetcher, data_variance, normalisation_scale, shuffled_batches
from train.export import export_dictionary, load_dictionary
from train.memory import retain_freed_memory

log = logging.getLogger(__name__)


@dataclass
class FiringTracker:
    """Tokens since each latent last fired, and firing counts over the current metrics window."""

    tokens_since_fired: torch.Tensor
    window_counts: torch.Tensor
    window_tokens: int = 0

    @classmethod
    def create(cls, d_sae: int, device) -> FiringTracker:
        return cls(torch.zeros(d_sae, dtype=torch.long, device=device),
                   torch.zeros(d_sae, dtype=torch.long, device=device))

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        """``fired``: per-latent firing counts of this worker's batch; ``tokens``: the global batch."""
        counts = fired.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every worker agrees on which latents are dead
        self.window_counts += counts
        self.window_tokens += tokens
        self.tokens_since_fired += tokens
        self.tokens_since_fired[counts > 0] = 0

    def reset_window(self) -> None:
        self.window_counts.zero_()
        self.window_tokens = 0


def learning_rate(step: int, total_steps: int, peak: float, warmup: int, decay_fraction: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = total_steps * (1 - decay_fraction)
    if step >= decay_start and decay_fraction > 0:
        return peak * max(0.0, (total_steps - step) / (total_steps - decay_start))
    return peak


def train_step(dictionary: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               dead_mask: torch.Tensor | None, variance: float | None = None):
    module = getattr(dictionary, "module", dictionary)  # DDP wraps the dictionary
    # Called through __call__ (forward = training_loss) so DDP can sync gradients in backward.
    output = dictionary(batch, dead_mask, variance)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    module.before_optimizer_step()
    optimizer.step()
    module.after_step()
    return output


@dataclass
class TrainingPlan:
    """Everything a worker needs, resolved once by the driver (plain data: it travels to workers)."""

    config: TrainConfig
    store_url: str
    d_model: int
    d_sae: int
    name: str
    folder: str
    total_steps: int
    warmup_steps: int
    dead_tokens: int
    peak_lr: float
    scale: float
    variance: float


def resolve_store_url(config: TrainConfig) -> str:
    if config.store:
        return config.store
    if not config.hook:
        raise ValueError("give train.store (a store URL) or train.hook (e.g. resid_post.15)")
    return store_url(config.run, config.hook)


def plan_training(config: TrainConfig) -> TrainingPlan:
    config = dataclasses.replace(config, run=storage.absolute_url(config.run))
    store = ActivationStore(storage.absolute_url(resolve_store_url(config)), config.storage_options)
    config.validate(store.d_model)
    if config.trackers:
        from train.trackers import check_trackers, driver_tracking_uri

        check_trackers(config.trackers)
        config = dataclasses.replace(config, tracking_uri=config.tracking_uri or driver_tracking_uri())
    if config.eval_tokens > 0 and not {"corpus", "context_length"} <= set(store.manifest):
        # Found now rather than after training: the evaluation needs the harvest's model and corpus.
        raise ConfigError(f"store {store.url} records no harvest corpus/context (not written by a harvest?); "
                          "set train.eval_tokens: 0 to skip the held-out evaluation")
    d_sae = config.latents(store.d_model)
    scale = normalisation_scale(store)
    total_tokens = config.tokens or store.num_rows
    total_steps = max(1, total_tokens // config.batch_size)
    name = config.name or f"{config.architecture}-{store.hook}-{config.width}-k{config.k}"
    return TrainingPlan(
        config=config, store_url=store.url, d_model=store.d_model, d_sae=d_sae, name=name,
        folder=storage.join(config.run, "dictionaries", name), total_steps=total_steps,
        warmup_steps=max(1, min(config.lr_warmup_steps, total_steps // 10)),  # short runs still reach the peak
        dead_tokens=config.dead_tokens or min(10_000_000, max(config.batch_size, total_tokens // 4)),
        peak_lr=config.lr or 2e-4 / math.sqrt(d_sae / 2**14), scale=scale, variance=data_variance(store, scale))


def new_optimizer(dictionary: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where it has one: one pass over each tensor instead of about
    ten elementwise ones (≈5× less optimiser time on the CPU here). The fused kernel copies a
    non-contiguous tensor in and out (W_enc is kept column-major: its gradient comes out of the
    sparse kernels as [d_sae, d_in] rows), which costs more than it saves; those take the foreach
    path in a second parameter group."""
    parameters = list(dictionary.parameters())
    if not all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in parameters):
        return torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    groups = [{"params": [p for p in parameters if p.is_contiguous()], "fused": True},
              {"params": [p for p in parameters if not p.is_contiguous()], "foreach": True}]
    return torch.optim.Adam([group for group in groups if group["params"]], lr=lr, betas=(0.9, 0.999),
                            eps=6.25e-10)


def new_dictionary(plan: TrainingPlan, device) -> torch.nn.Module:
    config = plan.config
    torch.manual_seed(config.seed)
    return build(config.architecture, d_in=plan.d_model, d_sae=plan.d_sae, k=config.k,
                 aux_coefficient=config.aux_coefficient, seed=config.seed, **config.extra).to(device)


def train_worker(plan: TrainingPlan, rank: int = 0, world: int = 1, device="cpu", resume: dict | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 on_report: Callable[[dict, dict | None], None] | None = None, checkpoint_every: int = 0):
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
    optimizer = new_optimizer(dictionary, plan.peak_lr)
    tracker = FiringTracker.create(plan.d_sae, device)
    start_step = 0
    if resume:
        dictionary.load_state_dict(resume["dictionary"])
        optimizer.load_state_dict(resume["optimizer"])
        tracker.tokens_since_fired.copy_(resume["tokens_since_fired"])
        start_step = resume["step"]
    else:
        first = next(shuffled_batches(store, config.batch_size, config.buffer_rows, config.seed, plan.scale, device,
                                      lanes=lanes))  # the whole global batch: every worker starts the same
        dictionary.initialise_from(first)
    model = wrap(dictionary) if wrap else dictionary
    progress = Progress("train", plan.total_steps, "steps", interval=5.0)
    # Started only now, right before the try that closes it: nothing above can leave its thread running.
    batches = Prefetcher(shuffled_batches(store, config.batch_size, config.buffer_rows, config.seed, plan.scale,
                                          device, skip_batches=resume["step"] if resume else 0, lanes=lanes,
                                          lane_ids=list(range(rank * per_worker, (rank + 1) * per_worker))))
    started = window_started = time.monotonic()
    window_waited = 0.0
    try:
        for step in range(start_step, plan.total_steps):
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, plan.total_steps, plan.peak_lr, plan.warmup_steps,
                                            config.lr_decay_fraction)
            dictionary.begin_step(step, plan.total_steps)
            dead_mask = tracker.tokens_since_fired >= plan.dead_tokens
            output = train_step(model, optimizer, batch, dead_mask if dead_mask.any() else None, plan.variance)
            tracker.update(output.fired, tokens=config.batch_size)
            done = step + 1
            metrics = None
            if done % config.log_every == 0 or done == plan.total_steps:
                frequencies = tracker.window_counts.float() / max(tracker.window_tokens, 1)
                metrics = {"step": done, "tokens": done * config.batch_size, "loss": float(output.loss.detach()),
                           **output.terms,
                           "dead_fraction": float(dead_mask.float().mean()),
                           "dense_fraction": float((frequencies > 0.1).float().mean()),
                           "lr": optimizer.param_groups[0]["lr"],
                           "tokens_per_second": (done - start_step) * config.batch_size / (time.monotonic() - started),
                           # Time the loop sat waiting for data; the prefetch thread should keep it near 0.
                           "data_wait_fraction": (batches.waited - window_waited) / (time.monotonic() - window_started)}
                tracker.reset_window()
                window_started, window_waited = time.monotonic(), batches.waited
            state = None
            if done == plan.total_steps or (checkpoint_every and done % checkpoint_every == 0):
                state = {"step": done, "dictionary": dictionary.state_dict(), "optimizer": optimizer.state_dict(),
                         "tokens_since_fired": tracker.tokens_since_fired.clone()}
            if on_report and (metrics or state):
                on_report(metrics, state)
            if rank == 0:
                progress.update(done, done * config.batch_size,
                                f"fvu {output.terms['fvu']:.3f}  dead {float(dead_mask.float().mean()):.1%}",
                                final=done == plan.total_steps)
    finally:
        batches.close()
    return dictionary


class MetricsLog:
    """metrics.jsonl of a dictionary, rewritten whole each time (object stores cannot append),
    mirrored to the configured experiment trackers when ``track`` is set."""

    def __init__(self, plan: TrainingPlan, track: bool = False):
        self.fs, folder = storage.url_to_fs(plan.folder, plan.config.storage_options)
        self.path = storage.join(folder, "metrics.jsonl")
        self.trackers_path = storage.join(folder, "trackers.json")
        self.lines: list[str] = []
        if storage.exists(self.fs, self.path):
            with self.fs.open(self.path, "rb") as handle:
                self.lines = handle.read().decode().splitlines()
        self.trackers = []
        if track and plan.config.trackers:
            from train.trackers import open_trackers

            run_ids = storage.read_json(self.fs, self.trackers_path) if storage.exists(self.fs, self.trackers_path) \
                else {}
            self.trackers = open_trackers(plan.config, plan.name, run_ids)
            storage.write_json(self.fs, self.trackers_path, {tracker.name: tracker.run_id for tracker in self.trackers})

    def add(self, metrics: dict) -> None:
        # A resumed run repeats nothing: drop lines from steps at or after this one.
        self.lines = [line for line in self.lines if json.loads(line)["step"] < metrics["step"]]
        self.lines.append(json.dumps(metrics))
        storage.write_bytes(self.fs, self.path, ("\n".join(self.lines) + "\n").encode())
        for tracker in self.trackers:
            tracker.log(metrics)

    def add_summary(self, values: dict, step: int) -> None:
        """Values for the trackers only (metrics.jsonl holds training lines)."""
        for tracker in self.trackers:
            tracker.log({"step": step, **values})

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    @property
    def last(self) -> dict:
        return json.loads(self.lines[-1]) if self.lines else {}


def finish(plan: TrainingPlan, dictionary: torch.nn.Module) -> dict:
    """Export, then measure the exported dictionary (so the export itself is what is evaluated):
    feature density on a sample of the store, the held-out evaluation, and the training plot."""
    from train.evaluate import evaluate_dictionary
    from train.plot import plot_training

    config = plan.config
    store = ActivationStore(plan.store_url, config.storage_options)
    training = {key: value for key, value in vars(config).items() if key != "storage_options"}
    metadata = {"lexica_store": store.url, "hook": store.hook, "model": store.manifest["model"],
                "d_model": store.d_model, "store_dtype": store.manifest["dtype"], "name": plan.name,
                "training": {**training, "steps": plan.total_steps}}
    final_url = storage.join(plan.folder, "final")
    export_dictionary(dictionary.cpu(), plan.scale, final_url, metadata, config.storage_options)
    exported = load_dictionary(final_url, config.storage_options)
    fs, folder = storage.url_to_fs(plan.folder, config.storage_options)
    density = feature_density(exported, store)
    storage.write_json(fs, storage.join(folder, "feature_density.json"), density.tolist())
    evaluation = {}
    if config.eval_tokens > 0:
        evaluation = evaluate_dictionary(exported, store.manifest, config.eval_tokens, config.eval_corpus,
                                         config.device, config.storage_options)
        storage.write_json(fs, storage.join(folder, "evaluation.json"), evaluation)
        if config.trackers:
            metrics_log = MetricsLog(plan, track=True)  # continues the training's tracker run
            metrics_log.add_summary({f"eval/{key}": value for key, value in evaluation.items()
                                     if isinstance(value, float)}, step=plan.total_steps)
            metrics_log.close()
    plot_url = plot_training(plan.folder, storage_options=config.storage_options)
    return {"name": plan.name, "folder": plan.folder, "final": MetricsLog(plan).last, "scale": plan.scale,
            "steps": plan.total_steps, "dictionary": dictionary, "evaluation": evaluation,
            "density": density, "plot": plot_url}


@torch.no_grad()
def feature_density(dictionary: torch.nn.Module, store: ActivationStore, max_tokens: int = 65536) -> torch.Tensor:
    """Per-latent firing frequency of the final dictionary on (up to) the first ``max_tokens`` of
    the store: measured after training, not averaged over a run that kept changing."""
    counts = torch.zeros(dictionary.d_sae, dtype=torch.long)
    seen = 0
    for batch in store.iter_batches(batch_rows=4096):
        code = dictionary.encode(batch.activation.float())
        counts += torch.bincount(code.indices[code.values > 0], minlength=dictionary.d_sae)
        seen += len(batch.activation)
        if seen >= max_tokens:
            break
    return counts.double() / max(seen, 1)


def fit(config: TrainConfig) -> dict:
    """Train in this process (``workers: 0``) or as a Ray Train job; then export."""
    from harvest.pool import record_stage

    plan = plan_training(config)
    fs, folder = storage.url_to_fs(plan.folder, config.storage_options)
    storage.check_writable(fs, folder, plan.folder)  # before training, not at the first checkpoint
    record_stage(config.run, config.storage_options, "train", {**dataclasses.asdict(config), "name": plan.name})
    if config.workers == 0:
        metrics_log = MetricsLog(plan, track=True)
        device = "cuda" if config.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if config.device == "auto" else config.device)
        try:
            dictionary = train_worker(plan, device=device,
                                      on_report=lambda metrics, state: metrics and metrics_log.add(metrics))
        finally:
            metrics_log.close()
        return finish(plan, dictionary)
    from train.job import run_ray_training

    return finish(plan, run_ray_training(plan))
