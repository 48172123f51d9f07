"""BatchTopK (Bussmann et al. 2024): keep the batch_size·k largest pre-activations of the whole
batch rather than k per token, so hard tokens get more latents and easy ones fewer, at the same
average L0. Inference cannot see a batch, so training keeps a running estimate of the smallest
selected activation and inference uses it as a threshold (exported as SAELens ``jumprelu``)."""

from __future__ import annotations

import torch

from lexica.train.architectures import SparseCode, TrainOutput, register
from lexica.train.architectures.parts import padded_code, threshold_code
from lexica.train.architectures.topk import TopK, TopKOptions
from lexica.train.sparse import select_with_sparse_grad, sparse_decode, sparse_pattern

THRESHOLD_MOMENTUM = 0.99


@register("batchtopk", TopKOptions)
class BatchTopK(TopK):
    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                 seed: int = 0, d_out: int | None = None, skip: bool = False):
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, seed, d_out, skip)
        # One threshold shared by all latents, stored per latent: the export's shape and the
        # state_dict's are the same, so exported weights load back directly. Negative = not yet set.
        self.register_buffer("threshold", torch.full((d_sae,), -1.0))

    def _select_batch(self, pre_activations: torch.Tensor):
        """(rows, latents, values) of the batch's top batch·k pre-activations, rows ascending."""
        values, flat = pre_activations.view(-1).topk(len(pre_activations) * self.k, sorted=False)
        flat, order = flat.sort()
        return flat // self.d_sae, flat % self.d_sae, values[order]

    def _encode_batch(self, x: torch.Tensor):
        """(centered x, pre-activations, rows, latents, values with encoder gradients, pattern) of
        the batch-wide selection, the threshold tracked on the way."""
        centered = x - self.input_offset.detach()
        pre_activations = self.pre_activations(centered, reuse=True)
        rows, latents, values = self._select_batch(pre_activations)
        self._track_threshold(values)
        pattern = sparse_pattern(rows, latents, len(x), self.d_sae)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.input_offset, values, pattern).relu()
        return centered, pre_activations, rows, latents, values, pattern

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered, pre_activations, rows, latents, values, pattern = self._encode_batch(x)
        error = self.with_skip(sparse_decode(values, self.W_dec, pattern, self.b_dec, target=y), x)
        return self.losses(x, centered, error, padded_code(rows, latents, values, len(x)), dead_mask, variance,
                           pre_activations, y)

    @torch.no_grad()
    def _track_threshold(self, selected: torch.Tensor) -> None:
        positive = selected[selected > 0]
        smallest = positive.min() if len(positive) else torch.zeros((), device=selected.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.AVG)
        if self.threshold[0] < 0:
            self.threshold.fill_(float(smallest))
        else:
            self.threshold.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * smallest)

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Per-token codes without a batch: every latent above the learned threshold."""
        return threshold_code(self.pre_activations(x - self.input_offset), self.threshold.clamp_min(0))

    def export_config(self) -> dict:
        return {"architecture": "jumprelu"}  # threshold inference is exactly a JumpReLU

    def export_extra(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.clamp_min(0).clone()}
