"""One training step and what it needs: the firing tracker (dead latents) and the learning-rate
schedule (the optimisers are in ``optimizers.py``). ``train_step`` is small and testable;
architectures never touch it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lexica.train.shard import average_gradients


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

    def update(self, fired: torch.Tensor, tokens: int, group=None) -> None:
        """``fired``: per-latent firing counts of this worker's batch; ``tokens``: the global batch;
        ``group``: the workers holding the same latents (None: all of them)."""
        counts = fired.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, group=group)  # every worker agrees on which latents are dead
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
    shard = getattr(module, "shard", None)
    if shard is not None and shard.sharded:  # a shard's copies average their gradients here, not by DDP
        average_gradients(module, shard)
    module.before_optimizer_step()
    optimizer.step()
    module.after_step()
    return output
