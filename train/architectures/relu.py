"""ReLU dictionary with a decoder-norm-weighted L1 penalty (Anthropic, "Training Sparse
Autoencoders", April 2024 update): loss = ‖x − x̂‖² + λ·Σᵢ fᵢ‖dᵢ‖ with λ warmed up linearly over
the first 5% of training, decoder rows free in norm (the penalty keeps them honest), small tied
initialisation (rows of norm 0.1, encoder = decoder transpose).

Early in training most latents fire, and dense autograd is fastest; once fewer than
``SPARSE_BELOW`` of the (token, latent) pairs are active, only those pairs enter autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lexica.config import knob
from lexica.train.architectures import SparseCode, TrainOutput, check_ranges, register
from lexica.train.architectures.parts import (
    Endpoints,
    active_pairs,
    batch_variance,
    linear_warmup,
    padded_code,
    reconstruction_loss,
    threshold_code,
)
from lexica.train.shard import Shard, total
from lexica.train.sparse import decode_code, select_with_sparse_grad, sparse_pattern

SPARSE_BELOW = 0.05  # active fraction under which the sparse kernels beat dense matmuls


@dataclass
class ReLUOptions:
    l1_coefficient: float = knob(5.0, "L1 penalty weight, in units of the per-token variance (Anthropic's lambda)")
    sparsity_warmup: float = knob(0.05, "fraction of training over which the L1 coefficient ramps up from 0")
    init_norm: float = knob(0.1, "initial norm of each decoder row")

    def validate(self) -> None:
        check_ranges([(self.l1_coefficient >= 0, "l1_coefficient", self.l1_coefficient, ">= 0"),
                      (0 <= self.sparsity_warmup <= 1, "sparsity_warmup", self.sparsity_warmup, "0..1"),
                      (self.init_norm > 0, "init_norm", self.init_norm, "> 0")], "relu")


@register("relu", ReLUOptions)
class ReLU(Endpoints):
    def __init__(self, d_in: int, d_sae: int, l1_coefficient: float = 5.0, sparsity_warmup: float = 0.05,
                 init_norm: float = 0.1, seed: int = 0, d_out: int | None = None, skip: bool = False,
                 shard: Shard | None = None, **_ignored):
        super().__init__()
        self.l1_coefficient, self.sparsity_warmup = l1_coefficient, sparsity_warmup
        self.init_weights(d_in, d_sae, seed, row_norm=init_norm, d_out=d_out, skip=skip, shard=shard)
        self.coefficient_scale = 1.0  # sparsity warm-up: a function of the step, set by begin_step
        self.sparse_path = False  # both paths give the same gradients; see training_loss

    def initialise_from(self, batch: torch.Tensor) -> None:
        self.initialise_offsets(batch)

    def encode_rows(self, x: torch.Tensor) -> SparseCode:
        with torch.no_grad():
            return threshold_code(torch.addmm(self.b_enc, x - self.input_offset, self.W_enc), 0.0)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return decode_code(code.indices, code.values, self.W_dec) + self.b_dec

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered = x - self.input_offset.detach()
        decoder_norms = self.W_dec.norm(dim=1)
        if self.sparse_path or self.over_budget(len(x)):
            rows, latents, values = active_pairs(self, centered, 0.0)
            pattern = sparse_pattern(rows, latents, len(x), self.d_sae)
            values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.encoder_offset, values, pattern)
            error = self.training_error(values, pattern, x, y)
            l1 = self.summed((values * decoder_norms[latents]).sum()) / len(x)
            code = padded_code(rows, latents, values.detach(), len(x))
            fired = torch.bincount(latents, minlength=self.d_sae)
        else:
            codes = torch.relu(self.encoder_product(x - self.encoder_offset))
            if self.shard.sharded or codes.dtype != self.W_dec.dtype:
                error = self.with_skip(self.summed(self.decoder_product(codes)) + self.b_dec - y, x)
            else:
                error = self.with_skip(torch.addmm(self.b_dec, codes, self.W_dec).sub_(y), x)
            l1 = self.summed((codes.float() * decoder_norms).sum()) / len(x)
            code = None  # materialising a padded code of a dense batch would cost more than the step
            fired = (codes.detach() > 0).sum(0)
        # The next step takes the sparse path once this one was sparse enough.
        self.sparse_path = float(fired.sum()) < SPARSE_BELOW * len(x) * self.d_sae
        shifted_target = self.shifted_target(y, centered)
        loss, fvu = reconstruction_loss(error, shifted_target, variance)
        # In the units of the reconstruction loss (per-token variance), so λ means what it means
        # in the paper whatever the loss normalisation.
        per_token_variance = variance if variance is not None else float(batch_variance(shifted_target)) / len(x)
        scale = 1.0 / per_token_variance
        loss = loss + self.l1_coefficient * self.coefficient_scale * scale * l1
        return TrainOutput(loss, error, code, fvu,
                           {"fvu": float(fvu.detach()), "l1": float(l1.detach()),
                            "l0": float(total(fired.sum(), self.shard)) / len(x)}, fired)

    forward = training_loss

    def begin_step(self, step: int, total_steps: int) -> None:
        self.coefficient_scale = linear_warmup(step, total_steps, self.sparsity_warmup)

    def before_optimizer_step(self) -> None:
        pass  # decoder norms are free: the penalty weights each code by its row's norm

    def after_step(self) -> None:
        pass

    def export_config(self) -> dict:
        return {"architecture": "standard"}  # SAELens' name for a ReLU dictionary

    def export_extra(self) -> dict[str, torch.Tensor]:
        return {}
