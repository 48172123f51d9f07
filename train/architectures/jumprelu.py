"""JumpReLU (Rajamanoharan et al. 2024, the Gemma Scope dictionaries): a latent passes its
pre-activation through only above its own learned threshold θ, and the loss penalises L0 directly.
The step function has no useful gradient, so θ learns through straight-through estimators: a
rectangle kernel of width ``bandwidth`` around θ stands in for the Dirac delta.

Only (token, latent) pairs that are active or within half a bandwidth of θ enter autograd, so the
sparsity is exploited as in TopK: the dense encoder matmul is the only dense work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lexica.config import knob
from lexica.train.architectures import SparseCode, TrainOutput, check_ranges, register
from lexica.train.architectures.parts import (
    Endpoints,
    active_pairs,
    firing_counts,
    linear_warmup,
    padded_code,
    reconstruction_loss,
    threshold_code,
)
from lexica.train.shard import Shard
from lexica.train.sparse import decode_code, select_with_sparse_grad, sparse_pattern


@dataclass
class JumpReLUOptions:
    l0_coefficient: float = knob(2e-3, "L0 penalty weight, in units of the per-token variance (0.002 trades one "
                                       "active latent for 0.2% of the variance)")
    bandwidth: float = knob(0.05, "width of the straight-through estimators' kernel around each threshold")
    sparsity_warmup: float = knob(0.05, "fraction of training over which the L0 coefficient ramps up from 0")
    initial_density: float = knob(0.03, "each threshold starts where its latent fires on this fraction of the "
                                        "first batch")
    init_norm: float = knob(0.1, "initial norm of each decoder row")

    def validate(self) -> None:
        check_ranges([(self.l0_coefficient >= 0, "l0_coefficient", self.l0_coefficient, ">= 0"),
                      (self.bandwidth > 0, "bandwidth", self.bandwidth, "> 0"),
                      (0 <= self.sparsity_warmup <= 1, "sparsity_warmup", self.sparsity_warmup, "0..1"),
                      (0 < self.initial_density < 1, "initial_density", self.initial_density, "between 0 and 1"),
                      (self.init_norm > 0, "init_norm", self.init_norm, "> 0")], "jumprelu")


@register("jumprelu", JumpReLUOptions)
class JumpReLU(Endpoints):
    def __init__(self, d_in: int, d_sae: int, k: int = 1, l0_coefficient: float = 2e-3, bandwidth: float = 0.05,
                 sparsity_warmup: float = 0.05, initial_density: float = 0.03, init_norm: float = 0.1,
                 seed: int = 0, d_out: int | None = None, skip: bool = False, shard: Shard | None = None,
                 **_ignored):
        super().__init__()
        # No k: the L0 penalty sets the sparsity. Its coefficient is in units of the per-token
        # variance (as the loss), so 2e-3 ≈ trading one active latent for 0.2% of the variance.
        self.l0_coefficient, self.bandwidth, self.sparsity_warmup = l0_coefficient, bandwidth, sparsity_warmup
        self.init_weights(d_in, d_sae, seed, row_norm=init_norm, d_out=d_out, skip=skip, shard=shard)
        self.initial_density = initial_density
        self.threshold = nn.Parameter(torch.full((self.d_sae,), 1e-3))  # set from data by initialise_from
        self.coefficient_scale = 1.0  # sparsity warm-up: a function of the step, set by begin_step

    @torch.no_grad()
    def initialise_from(self, batch: torch.Tensor) -> None:
        """b_dec at the data mean; each θ where its latent fires on ``initial_density`` of the batch.

        A fairly dense start (3%, ~100 latents per token at 4k) lets every latent learn before the
        penalty sparsifies; starting at θ ≈ 0 (half the latents firing) would cost hundreds of
        steps of θ climbing at about the learning rate per step, with the slowest kernels."""
        x, _ = self.initialise_offsets(batch)
        centered = x - self.input_offset
        rank = max(1, min(len(x), round(len(x) * (1 - self.initial_density))))
        # Over latent chunks within the memory budget: each threshold is its own column's quantile.
        columns = max(1, self.encoder_budget // (4 * len(x)))
        for start in range(0, self.d_sae, columns):
            latents = slice(start, start + columns)
            pre_activations = self.encoder_product(centered, latents)
            self.threshold[latents] = pre_activations.kthvalue(rank, dim=0).values.clamp_min(1e-3)

    def pre_activations(self, centered: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder_product(centered)

    def encode_rows(self, x: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_activations(x - self.input_offset), self.threshold)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return decode_code(code.indices, code.values, self.W_dec) + self.b_dec

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered = x - self.input_offset.detach()
        threshold = self.threshold.detach()
        rows, latents, pre_activations, pair_active, pair_near = active_pairs(self, centered, threshold,
                                                                              near=self.bandwidth / 2)
        pair_near = pair_near.to(x.dtype)
        pattern = sparse_pattern(rows, latents, len(x), self.d_sae)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.encoder_offset, pre_activations,
                                         pattern)
        # Straight-through terms, zero in the forward pass: d(value)/dθ = -θ/ε·K and d(step)/dθ =
        # -1/ε·K, with K the rectangle kernel (1 within half a bandwidth of θ).
        theta = self.threshold[latents]
        moved = theta - theta.detach()
        values = values * pair_active + moved * (-theta.detach() / self.bandwidth * pair_near)
        steps = pair_active.to(x.dtype) + moved * (-pair_near / self.bandwidth)
        error = self.training_error(values, pattern, x, y)
        loss, fvu = reconstruction_loss(error, self.shifted_target(y, centered), variance)
        l0 = self.summed(steps.sum()) / len(x)
        loss = loss + self.l0_coefficient * self.coefficient_scale * l0
        code = padded_code(rows[pair_active], latents[pair_active], values.detach()[pair_active], len(x))
        return TrainOutput(loss, error, code, fvu, {"fvu": float(fvu.detach()), "l0": float(l0.detach())},
                           firing_counts(code.indices, code.values, self.d_sae))

    forward = training_loss

    def begin_step(self, step: int, total_steps: int) -> None:
        self.coefficient_scale = linear_warmup(step, total_steps, self.sparsity_warmup)

    def before_optimizer_step(self) -> None:
        pass  # decoder rows are free: L0 does not depend on their norms

    @torch.no_grad()
    def after_step(self) -> None:
        self.threshold.clamp_(min=1e-6)  # θ ≤ 0 would make the latent a plain ReLU

    def export_config(self) -> dict:
        return {"architecture": "jumprelu"}

    def export_extra(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}  # pre-activations do not change when the
        # normalisation is folded in, so neither does θ
