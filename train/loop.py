"""The training loop of one worker: batches → step → metrics; then export.

``train_step`` is a small, testable function; ``fit`` wires the store, the schedule, metrics and
export around it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import torch

from harvest import storage
from harvest.progress import Progress
from harvest.store import ActivationStore, store_url
from train.architectures import build
from train.config import TrainConfig
from train.data import normalisation_scale, shuffled_batches
from train.export import export_dictionary

log = logging.getLogger(__name__)


@dataclass
class FiringTracker:
    """Tokens since each latent last fired, and firing counts over the current metrics window."""

    tokens_since_fired: torch.Tensor
    window_counts: torch.Tensor
    window_tokens: int = 0

    @classmethod
    def create(cls, d_sae: int, device) -> FiringTracker:
        return cls(torch.zeros(d_sae, dtype=torch.long, device=device), torch.zeros(d_sae, dtype=torch.long,
                                                                                      device=device))

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        fired = indices[values > 0]
        counts = torch.bincount(fired, minlength=len(self.window_counts))
        self.window_counts += counts
        self.window_tokens += indices.shape[0]
        self.tokens_since_fired += indices.shape[0]
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
               dead_mask: torch.Tensor | None) -> tuple:
    output = dictionary.training_loss(batch, dead_mask)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    dictionary.before_optimizer_step()
    optimizer.step()
    dictionary.after_step()
    return output


def resolve_store_url(config: TrainConfig) -> str:
    if config.store:
        return config.store
    if not config.hook:
        raise ValueError("give train.store (a store URL) or train.hook (e.g. resid_post.15)")
    return store_url(config.run, config.hook)


def fit(config: TrainConfig) -> dict:
    store = ActivationStore(resolve_store_url(config), config.storage_options)
    config.validate(store.d_model)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    d_sae = config.latents(store.d_model)
    name = config.name or f"{config.architecture}-{store.hook}-{config.width}-k{config.k}"
    total_tokens = config.tokens or store.num_rows
    total_steps = max(1, total_tokens // config.batch_size)
    dead_tokens = config.dead_tokens or min(10_000_000, max(config.batch_size, total_tokens // 4))
    peak_lr = config.lr or 2e-4 / math.sqrt(d_sae / 2**14)
    warmup_steps = max(1, min(config.lr_warmup_steps, total_steps // 10))  # short runs still reach the peak
    scale = normalisation_scale(store)
    torch.manual_seed(config.seed)
    dictionary = build(config.architecture, d_in=store.d_model, d_sae=d_sae, k=config.k,
                       aux_coefficient=config.aux_coefficient, seed=config.seed, **config.extra).to(device)
    batches = shuffled_batches(store, config.batch_size, config.buffer_rows, config.seed, scale, device)
    first = next(batches)
    with torch.no_grad():  # b_dec starts at the data mean, not zero: no wasted early steps
        dictionary.b_dec.copy_(first.mean(0))
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=peak_lr, betas=(0.9, 0.999), eps=6.25e-10)
    folder = storage.join(config.run, "dictionaries", name)
    fs, folder_path = storage.url_to_fs(folder, config.storage_options)
    fs.makedirs(folder_path, exist_ok=True)
    metrics_lines: list[str] = []
    tracker = FiringTracker.create(d_sae, device)
    progress = Progress("train", total_steps, "steps", interval=5.0)
    started = time.monotonic()
    batch = first
    last = {}
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, peak_lr, warmup_steps, config.lr_decay_fraction)
        dead_mask = tracker.tokens_since_fired >= dead_tokens
        output = train_step(dictionary, optimizer, batch, dead_mask if dead_mask.any() else None)
        tracker.update(output.code.indices, output.code.values.detach())
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            frequencies = tracker.window_counts.float() / max(tracker.window_tokens, 1)
            last = {"step": step + 1, "tokens": (step + 1) * config.batch_size, "loss": float(output.loss.detach()),
                    **output.terms, "l0": float((output.code.values > 0).sum(1).float().mean()),
                    "dead_fraction": float(dead_mask.float().mean()),
                    "dense_fraction": float((frequencies > 0.1).float().mean()),
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_second": (step + 1) * config.batch_size / (time.monotonic() - started)}
            metrics_lines.append(json.dumps(last))
            tracker.reset_window()
            metrics_text = "\n".join(metrics_lines) + "\n"
            storage.write_bytes(fs, storage.join(folder_path, "metrics.jsonl"), metrics_text.encode())
        progress.update(step + 1, (step + 1) * config.batch_size,
                        f"fvu {output.terms['fvu']:.3f}  dead {float(dead_mask.float().mean()):.1%}",
                        final=step + 1 == total_steps)
        if step + 1 < total_steps:
            batch = next(batches)
    metadata = {"lexica_store": store.url, "hook": store.hook, "model": store.manifest["model"],
                "d_model": store.d_model, "store_dtype": store.manifest["dtype"], "name": name,
                "training": {**{k: v for k, v in vars(config).items() if k != "storage_options"}, "steps": total_steps}}
    export_dictionary(dictionary, scale, storage.join(folder, "final"), metadata, config.storage_options)
    return {"name": name, "folder": folder, "final": last, "scale": scale, "steps": total_steps,
            "dictionary": dictionary}
