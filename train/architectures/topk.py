"""TopK dictionary with AuxK for dead latents (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): keep the k largest pre-activations, unit-norm decoder rows, and an auxiliary loss
that lets dead latents model the residual error."""

from __future__ import annotations

import torch
from torch import nn

from train.architectures import SparseCode, TrainOutput, register
from train.sparse import select_with_sparse_grad, sparse_decode


def fraction_of_variance_unexplained(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    total_variance = (target - target.mean(0)).pow(2).sum()
    return error.pow(2).sum() / total_variance.clamp_min(1e-12)


@register("topk")
class TopK(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                 seed: int = 0):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k = {k} is out of range; expected 1..d_sae ({d_sae})")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.aux_k = aux_k if aux_k is not None else min(d_sae, max(k, d_in // 2))
        self.aux_coefficient = aux_coefficient
        generator = torch.Generator().manual_seed(seed)
        decoder = torch.randn(d_sae, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        # Encoder starts as the decoder's transpose (Gao et al.): early codes are meaningful.
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def _select(self, centered: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        with torch.no_grad():
            pre_activations = torch.addmm(self.b_enc, centered, self.W_enc)
            if mask is not None:
                pre_activations.masked_fill_(~mask, float("-inf"))
            values, indices = pre_activations.topk(k, dim=1, sorted=False)
        return values, indices

    def encode(self, x: torch.Tensor) -> SparseCode:
        values, indices = self._select(x - self.b_dec, self.k)
        return SparseCode(values.relu(), indices)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec

    def training_loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        """Loss = FVU of the batch, or, given the data's per-token ``variance``, mean squared error
        over it: a sum over rows, so data-parallel workers averaging gradients equal one worker."""
        centered = x - self.b_dec.detach()
        values, indices = self._select(centered, self.k)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.b_dec, values, indices).relu()
        reconstruction = sparse_decode(indices, values, self.W_dec) + self.b_dec
        return self._losses(x, centered, reconstruction, SparseCode(values, indices), dead_mask, variance,
                            l0=float((values > 0).sum(1).float().mean()))

    def _losses(self, x, centered, reconstruction, code: SparseCode, dead_mask, variance, l0: float) -> TrainOutput:
        error = reconstruction - x
        fvu = fraction_of_variance_unexplained(error, x)
        loss = fvu if variance is None else error.pow(2).sum(1).mean() / variance
        auxk = self._auxk(centered, x, reconstruction, dead_mask, fvu, variance)
        loss = loss + self.aux_coefficient * auxk.nan_to_num(0.0)
        return TrainOutput(loss, reconstruction, code, fvu,
                           {"fvu": float(fvu.detach()), "auxk": float(auxk.detach()), "l0": l0})

    def _auxk(self, centered, x, reconstruction, dead_mask, fvu, variance) -> torch.Tensor:
        """AuxK: dead latents try to explain what the live ones miss (the residual), which pulls
        them back into use without disturbing the main reconstruction."""
        dead_count = int(dead_mask.sum()) if dead_mask is not None else 0
        if not dead_count:
            return torch.zeros((), device=x.device)
        aux_k = min(self.aux_k, dead_count)
        aux_values, aux_indices = self._select(centered, aux_k, dead_mask.unsqueeze(0))
        aux_values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.b_dec, aux_values,
                                             aux_indices).relu()
        residual = (x - reconstruction).detach()
        aux_error = sparse_decode(aux_indices, aux_values, self.W_dec) - residual
        if variance is None:
            return fraction_of_variance_unexplained(aux_error, residual)
        return aux_error.pow(2).sum(1).mean() / (variance * float(fvu.detach()) + 1e-12)

    forward = training_loss

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component that would change decoder row norms (kept at 1)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def export_config(self) -> dict:
        return {"architecture": "topk", "k": self.k}
