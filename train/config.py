"""Typed configuration of the train stage (the ``train:`` section of a pipeline config, or flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lexica import storage
from lexica.cluster import gpu_count
from lexica.config import ConfigError, knob
from lexica.run import ACTIVATIONS, Run, run_holding


@dataclass
class TrainConfig:
    run: str | None = knob(None, "run folder URL; the dictionary goes to <run>/dictionaries/<name>/ (default: the run "
                                 "that holds store)")
    store: str | None = knob(None, "activation store URL (default: <run>/activations/<hook>)")
    hook: str | None = knob(None, "hook whose store to train on when store is not given, e.g. resid_post.15")
    target: str | None = knob(None, "make a transcoder: the hook point it reconstructs from the hook it reads, e.g. "
                                    "hook mlp_in.15, target mlp_out.15 (the MLP's input to its output); both stores "
                                    "from the same harvest (topk, batchtopk or matryoshka)")
    skip: bool = knob(False, "a skip-transcoder: the transcoder adds a learned linear path from input to output")
    name: str | None = knob(None, "dictionary name (default: <architecture>-<hook>-<width>-k<k>, a transcoder's "
                                  "<architecture>-<hook>-to-<target>-<width>-k<k>)")
    architecture: str = knob("topk", "dictionary architecture (plugins in train/architectures/)")
    width: str = knob("16x", "latents: a multiple of d_model ('16x') or an absolute count ('4096')")
    k: int = knob(32, "active latents per token (TopK)")
    batch_size: int = knob(4096, "tokens per optimiser step")
    tokens: int | None = knob(None, "training tokens (default: one pass over the store)")
    optimizer: str = knob("adam", "adam, signsgd (each weight moves by +-lr) or muon (orthogonalised updates of the "
                                  "weight matrices, Adam for the rest)")
    schedule: str = knob("warmup-decay", "warmup-decay (linear warm-up, then linear decay over lr_decay_fraction) "
                                         "or schedule-free (warm-up, then averaged weights instead of a decay)")
    lr: float | None = knob(None, "peak learning rate (default per optimizer, x 1/sqrt(latents / 2^14): adam 8e-4 "
                                  "(chosen on real activations, bench/train.py --real), signsgd 5e-3, muon 8e-4)")
    lr_warmup_steps: int = knob(100, "linear learning-rate warm-up steps (at most a tenth of the run)")
    lr_decay_fraction: float = knob(0.2, "fraction of training at the end with linear decay to zero "
                                         "(warmup-decay only)")
    momentum: float = knob(0.9, "schedule-free interpolation: gradients are taken this far toward the average")
    seed: int = knob(0, "seed of initialisation and data order")
    buffer_rows: int = knob(262144, "tokens per shuffle block (token-level shuffling buffer)")
    data_lanes: int | None = knob(None, "independent data streams, each reading its own parts (default: workers); "
                                        "each worker reads only its lanes, and the same lanes give the same batches "
                                        "whatever the number of workers")
    dead_tokens: int | None = knob(None, "a latent is dead after this many tokens without firing (default "
                                         "min(10M, tokens/4))")
    aux_coefficient: float = knob(1 / 32, "weight of the AuxK loss for dead latents")
    resample_every: int = knob(0, "steps between resamplings of dead latents toward badly reconstructed inputs "
                                  "(Anthropic 2023), for any architecture; 0 never")
    log_every: int = knob(50, "steps between metric lines")
    workers: int | None = knob(None, "Ray Train workers (DDP): default one per GPU of the cluster, else one; 0 trains "
                                     "in this process without Ray")
    shards: int = knob(1, "split each dictionary's latents over this many workers: each holds 1/shards of the "
                          "weights and their optimiser state; workers must be a multiple (workers/shards "
                          "data-parallel copies)")
    encoder_budget_mb: int = knob(1024, "the largest dense [batch, latents] pre-activation tensor a worker holds at "
                                        "once (MiB); beyond it the encoder runs over row chunks")
    precision: str = knob("fp32", "fp32, or bf16-mixed: the dense encoder product (and ReLU's early dense decoder "
                                  "product) in bfloat16 from fp32 master weights; for GPUs (CPUs without bfloat16 "
                                  "units run it slower)")
    checkpoint_every: int = knob(200, "steps between checkpoints (Ray Train); a re-run resumes from the newest")
    cpus_per_worker: float | None = knob(None, "CPUs reserved per training worker, and its torch threads: default the "
                                               "cluster's CPUs shared among the workers")
    device: str = knob("auto", "auto (CUDA when present), cpu or cuda")
    eval_tokens: int = knob(4096, "held-out tokens for the final ΔCE / CE-recovered / KL evaluation; 0 skips it")
    eval_corpus: list[str] = knob([], "held-out text files for the evaluation (default: the harvest corpus's documents "
                                 "after the harvested ones)")
    trackers: list[str] = knob([], "optional experiment trackers to mirror metrics to: mlflow, wandb (each "
                                                  "installed separately)")
    tracking_uri: str | None = knob(None, "MLflow tracking URI (default: the driver's MLFLOW_TRACKING_URI)")
    experiment: str = knob("lexica", "MLflow experiment / W&B project name")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")
    extra: dict = knob({}, "the architecture's own options (see 'Architecture options' below), e.g. {aux_k: 256}")
    sweep: list[dict] | dict = knob([], "train many dictionaries in one job from one read of the store: a list of "
                                        "variants, e.g. [{k: 16}, {architecture: batchtopk, lr: 0.002}], or a grid, "
                                        "e.g. {k: [16, 32], width: [8x, 16x]}; a variant sets name, architecture, "
                                        "width, k, lr, seed (its initialisation), optimizer, schedule, momentum, "
                                        "lr_warmup_steps, lr_decay_fraction, dead_tokens, aux_coefficient, "
                                        "resample_every, skip or extra; train.name then names the sweep")

    def latents(self, d_model: int) -> int:
        text = str(self.width).strip()
        try:
            count = round(float(text[:-1]) * d_model) if text.endswith("x") else int(text)
        except ValueError as error:
            raise ConfigError(f"width {self.width!r} is invalid; expected e.g. '16x' or '4096'") from error
        if count < 1:
            raise ConfigError(f"width {self.width!r} gives {count} latents; expected at least 1")
        return count

    def lanes(self) -> int:
        return self.data_lanes or max(1, self.workers or 0)

    def validate(self, d_model: int) -> TrainConfig:
        latents = self.latents(d_model)
        if not 1 <= self.k <= latents:
            raise ConfigError(f"k = {self.k} is out of range for {latents} latents; expected 1..{latents}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size = {self.batch_size} is invalid; expected >= 1")
        lanes, workers = self.lanes(), max(1, self.workers or 0)
        if lanes % workers or self.batch_size % lanes:
            raise ConfigError(f"data_lanes = {lanes} must be a multiple of workers ({workers}) and divide batch_size "
                              f"({self.batch_size})")
        if self.precision not in ("fp32", "bf16-mixed"):
            raise ConfigError(f"precision {self.precision!r} is unknown; expected fp32 or bf16-mixed")
        if self.shards < 1 or self.encoder_budget_mb < 1:
            raise ConfigError(f"shards = {self.shards} and encoder_budget_mb = {self.encoder_budget_mb} must be >= 1")
        if self.shards > 1:
            if (self.workers or 0) < self.shards or self.workers % self.shards:
                raise ConfigError(f"shards = {self.shards} needs workers to be a multiple of it (workers = "
                                  f"{self.workers}): each shard is a Ray Train worker")
            if latents % self.shards:
                raise ConfigError(f"width {self.width} gives {latents} latents, which {self.shards} shards cannot "
                                  "split equally; choose shards dividing the width")
            if self.resample_every:
                raise ConfigError("resample_every is not available with shards > 1 yet; AuxK (dead latents, on by "
                                  "default) works with shards")
        from lexica.train.optimizers import OPTIMIZERS, SCHEDULES

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; expected one of {', '.join(SCHEDULES)}")
        if self.resample_every < 0:
            raise ConfigError(f"resample_every = {self.resample_every} is invalid; expected >= 0 (0: never)")
        if not 0 < self.momentum < 1:
            raise ConfigError(f"momentum = {self.momentum} is invalid; expected 0 < momentum < 1")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr = {self.lr} is invalid; expected > 0")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError(f"lr_decay_fraction = {self.lr_decay_fraction} is invalid; expected 0..1")
        from lexica.train.architectures import ARCHITECTURES, architecture_options, transcodes

        architecture_options(self.architecture, self.extra)  # unknown, mistyped or out-of-range options
        if self.skip and not self.target:
            raise ConfigError("skip: true makes a skip-transcoder; give train.target (the hook it reconstructs)")
        if self.target and not transcodes(self.architecture):
            raise ConfigError(f"architecture {self.architecture!r} cannot be a transcoder yet; transcoders are "
                              f"{', '.join(sorted(name for name in ARCHITECTURES if transcodes(name)))}")
        return self


def sized_for(config: TrainConfig, resources: dict[str, float]) -> TrainConfig:
    """``config`` with ``workers`` and ``cpus_per_worker`` left to their defaults sized to
    ``resources`` (a cluster's or this machine's CPU and GPU counts): one worker per GPU, else
    one; each worker with an equal share of the CPUs (all of them for one worker)."""
    workers = config.workers
    if workers is None:
        workers = max(1, gpu_count(resources, config.device))
    cpus = config.cpus_per_worker
    if cpus is None:
        cpus = float(max(1, int(resources.get("CPU", 1)) // max(1, workers)))
    return dataclasses.replace(config, workers=workers, cpus_per_worker=cpus)


def describe_defaults(resources: dict[str, float], device: str = "auto") -> str:
    """What the worker defaults come to on ``resources``, for ``--help``."""
    sized = sized_for(TrainConfig(device=device), resources)
    return (f"with this machine's {int(resources['CPU'])} CPUs and {int(resources['GPU'])} GPUs the defaults are "
            f"{sized.workers} worker(s) x {sized.cpus_per_worker:g} CPUs")


def resolve_sources(config: TrainConfig) -> TrainConfig:
    """``config`` with its run folder (as given, else the run that holds its store) and, when it
    names no store, a hook (as given, else the one the run's harvest recorded)."""
    config = with_run(config)
    if not config.store and not config.hook:
        config = dataclasses.replace(config, hook=Run(config.run, config.storage_options).harvested_hook())
    return config


def with_run(config: TrainConfig) -> TrainConfig:
    """``config`` with its run folder: as given, else the run that holds its store."""
    if config.run:
        return config
    if not config.store:
        raise ConfigError("give --run RUN (the run whose store to train on) or --store STORE_URL")
    run = run_holding(storage.absolute_url(config.store))
    if run is None:
        raise ConfigError(f"store {config.store} is not inside a run folder (<run>/{ACTIVATIONS}/<hook>); "
                          "give --run for the dictionary")
    return dataclasses.replace(config, run=run)
