"""The training plan: everything a worker needs, resolved once by the driver from the config and
the store (plain data, so it travels to Ray workers), and the new dictionary it describes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from lexica import storage
from lexica.config import ConfigError
from lexica.run import Run
from lexica.store import ActivationStore
from lexica.train.architectures import build
from lexica.train.config import TrainConfig, with_run
from lexica.train.data import data_variance, normalisation_scale, paired_commits
from lexica.train.sweep import apply_variant, sweep_name, sweep_variants, variant_suffix


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
    data_seed: int  # the order of the batches: the job's seed, shared by every dictionary of a sweep
    # A transcoder's target: its store, width and normalisation (variance above is the target's).
    target_url: str | None = None
    d_out: int | None = None
    target_scale: float = 1.0

    def batch_scale(self, device) -> float | torch.Tensor:
        """What a training batch is multiplied by: the input's scale, or per column [input | target]."""
        if self.target_url is None:
            return self.scale
        return torch.cat([torch.full((self.d_model,), self.scale), torch.full((self.d_out,), self.target_scale)]).to(
            device)


def resolve_store_url(config: TrainConfig) -> str:
    if config.store:
        return config.store
    if not config.hook:
        raise ConfigError("give train.store (a store URL) or train.hook (e.g. resid_post.15)")
    return Run(config.run, config.storage_options).store_url(config.hook)


# Where each hook kind sits in a decoder block, in the order a forward pass reaches them.
HOOK_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3, "resid_post": 4}


def check_order(hook: str, target: str) -> None:
    """A transcoder's target must come after its input in the forward pass: evaluation splices it
    in from the input's activations of the same pass."""
    def place(name: str) -> tuple[int, int]:
        kind, _, layer = name.rpartition(".")
        return int(layer), HOOK_ORDER.get(kind, 0)

    if place(target) <= place(hook):
        raise ConfigError(f"train.target {target} does not come after train.hook {hook} in the model; a transcoder "
                          "maps an earlier hook point to a later one (e.g. mlp_in.15 to mlp_out.15)")


def resolve_target_url(config: TrainConfig) -> str:
    """A transcoder's target store: ``train.target`` as a hook of the run, or a store URL."""
    if "/" in config.target:
        return config.target
    return Run(config.run, config.storage_options).store_url(config.target)


def plan_job(config: TrainConfig) -> list[TrainingPlan]:
    """The plans of a job's dictionaries: one, or one per variant of ``train.sweep`` (names unique,
    every plan reading the same batches)."""
    if not config.sweep:
        return [plan_training(config)]
    plans = [dataclasses.replace(plan_training(apply_variant(config, variant), variant_suffix(variant)),
                                 data_seed=config.seed) for variant in sweep_variants(config)]
    seen: dict[str, int] = {}
    for index, plan in enumerate(plans):
        if plan.name in seen:
            raise ConfigError(f"train.sweep[{index}] and train.sweep[{seen[plan.name]}] would both be named "
                              f"{plan.name!r}; give each a name or make them differ")
        seen[plan.name] = index
    return plans


def job_folder(config: TrainConfig, plans: list[TrainingPlan]) -> str:
    """Where the job's Ray Train checkpoints go: the dictionary's folder, or for a sweep
    ``<run>/sweeps/<sweep name>``."""
    if not config.sweep:
        return plans[0].folder
    run = plans[0].config.run
    hook = ActivationStore(plans[0].store_url, config.storage_options).hook
    return Run(run, config.storage_options).sweep_url(sweep_name(config, [plan.name for plan in plans], hook))


def plan_training(config: TrainConfig, name_suffix: str = "") -> TrainingPlan:
    config = with_run(config)
    config = dataclasses.replace(config, run=storage.absolute_url(config.run))
    store = ActivationStore(storage.absolute_url(resolve_store_url(config)), config.storage_options)
    config.validate(store.d_model)
    if config.trackers:
        from lexica.train.trackers import check_trackers, driver_tracking_uri

        check_trackers(config.trackers)
        config = dataclasses.replace(config, tracking_uri=config.tracking_uri or driver_tracking_uri())
    if config.eval_tokens > 0 and not {"corpus", "context_length"} <= set(store.manifest):
        # Found now rather than after training: the evaluation needs the harvest's model and corpus.
        raise ConfigError(f"store {store.url} records no harvest corpus/context (not written by a harvest?); "
                          "set train.eval_tokens: 0 to skip the held-out evaluation")
    d_sae = config.latents(store.d_model)
    scale = normalisation_scale(store)
    target = None
    if config.target:
        target = ActivationStore(storage.absolute_url(resolve_target_url(config)), config.storage_options)
        paired_commits(store, target)
        check_order(store.hook, target.hook)
    variance_store = target or store
    variance_scale = normalisation_scale(variance_store)
    total_tokens = config.tokens or store.num_rows
    total_steps = max(1, total_tokens // config.batch_size)
    hooks = store.hook if target is None else f"{store.hook}-to-{target.hook}{'-skip' if config.skip else ''}"
    name = config.name or f"{config.architecture}-{hooks}-{config.width}-k{config.k}{name_suffix}"
    return TrainingPlan(
        config=config, store_url=store.url, d_model=store.d_model, d_sae=d_sae, name=name,
        folder=Run(config.run, config.storage_options).dictionary_url(name), total_steps=total_steps,
        warmup_steps=max(1, min(config.lr_warmup_steps, total_steps // 10)),  # short runs still reach the peak
        dead_tokens=config.dead_tokens or min(10_000_000, max(config.batch_size, total_tokens // 4)),
        peak_lr=config.lr or default_lr(config.optimizer, d_sae), scale=scale,
        variance=data_variance(variance_store, variance_scale), data_seed=config.seed,
        target_url=target.url if target else None, d_out=target.d_model if target else None,
        target_scale=variance_scale)


# At 2^14 latents. Adam's is 4x Gao et al.'s 2e-4: on the demo model's real activations (block 15,
# 4,608 latents, k 32, 1.25M tokens in one pass, bench/train.py --real) held-out FVU was 0.130 at
# 1x, 0.095 at 2x, 0.086 at 4x, 0.100 at 6x and 0.122 at 8x (2.3% dead). SignSGD's is sparsify's;
# Muon's (not measured: slower than the step itself on a CPU) follows Adam's, as its update is
# scaled to Adam's RMS.
BASE_LR = {"adam": 8e-4, "signsgd": 5e-3, "muon": 8e-4}


def default_lr(optimizer: str, d_sae: int) -> float:
    """The peak learning rate for ``d_sae`` latents: wider dictionaries take smaller steps (Gao et
    al. 2024 fit lr ∝ 1/sqrt(latents) for Adam; the same scaling is kept for the others)."""
    return BASE_LR[optimizer] / math.sqrt(d_sae / 2**14)


def new_dictionary(plan: TrainingPlan, device, shard=None) -> torch.nn.Module:
    """The plan's new dictionary (only ``shard``'s slice of its latents, when given)."""
    config = plan.config
    torch.manual_seed(config.seed)
    dictionary = build(config.architecture, d_in=plan.d_model, d_sae=plan.d_sae, k=config.k,
                       aux_coefficient=config.aux_coefficient, seed=config.seed, options=config.extra,
                       d_out=plan.d_out, skip=config.skip, shard=shard)
    dictionary.encoder_budget = config.encoder_budget_mb << 20
    dictionary.compute_dtype = torch.bfloat16 if config.precision == "bf16-mixed" else torch.float32
    return dictionary.to(device)
