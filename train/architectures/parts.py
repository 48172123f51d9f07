"""Pieces the architectures share: initialisation, losses, decoder-norm constraints, code shapes."""

from __future__ import annotations

import torch

from train.architectures import SparseCode


def tied_init(d_in: int, d_sae: int, seed: int, row_norm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random decoder rows of norm ``row_norm`` and the encoder as their transpose, so that early
    codes already mean something (Gao et al. 2024; Anthropic's April 2024 update)."""
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_sae, d_in, generator=generator)
    decoder *= row_norm / decoder.norm(dim=1, keepdim=True)
    return decoder, decoder.t().clone()


def fraction_of_variance_unexplained(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    total_variance = (target - target.mean(0)).pow(2).sum()
    return error.pow(2).sum() / total_variance.clamp_min(1e-12)


def reconstruction_loss(error: torch.Tensor, fvu: torch.Tensor, variance: float | None) -> torch.Tensor:
    """FVU of the batch, or, given the data's per-token ``variance``, the mean squared error over
    it: a plain mean over rows, so data-parallel workers averaging gradients equal one worker."""
    return fvu if variance is None else error.pow(2).sum(1).mean() / variance


def firing_counts(latents: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """How many tokens of the batch each latent fired on (value > 0)."""
    return torch.bincount(latents.reshape(-1)[values.reshape(-1) > 0], minlength=d_sae)


@torch.no_grad()
def remove_parallel_gradient(W_dec: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit-norm) decoder row: steps then only rotate rows."""
    if W_dec.grad is not None:
        parallel = (W_dec.grad * W_dec).sum(dim=1, keepdim=True)
        W_dec.grad -= parallel * W_dec


@torch.no_grad()
def normalise_rows(W_dec: torch.nn.Parameter) -> None:
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def padded_code(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, batch: int) -> SparseCode:
    """Flat (row, latent, value) triples, rows ascending, as a [batch, max count] code padded with
    zero values (latent 0), the shape ``SparseCode`` users expect."""
    counts = torch.bincount(rows, minlength=batch)
    width = max(1, int(counts.max())) if len(rows) else 1
    starts = torch.cumsum(counts, 0) - counts
    columns = torch.arange(len(rows), device=rows.device) - starts[rows]
    padded_values = torch.zeros(batch, width, dtype=values.dtype, device=values.device)
    padded_latents = torch.zeros(batch, width, dtype=torch.long, device=latents.device)
    padded_values[rows, columns] = values
    padded_latents[rows, columns] = latents
    return SparseCode(padded_values, padded_latents)


def linear_warmup(step: int, total_steps: int, fraction: float) -> float:
    """0 → 1 over the first ``fraction`` of training (sparsity-coefficient warm-up)."""
    ramp = total_steps * fraction
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


def threshold_code(pre_activations: torch.Tensor, threshold: torch.Tensor | float) -> SparseCode:
    """Inference codes of threshold architectures: every pre-activation above its threshold."""
    rows, latents = (pre_activations > threshold).nonzero(as_tuple=True)
    return padded_code(rows, latents, pre_activations[rows, latents], len(pre_activations))
