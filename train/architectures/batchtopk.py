"""BatchTopK (Bussmann et al. 2024): keep the batch_size·k largest pre-activations of the whole
batch rather than k per token, so hard tokens get more latents and easy ones fewer, at the same
average L0. Inference cannot see a batch, so training keeps a running estimate of the smallest
selected activation and inference uses it as a threshold (exported as SAELens ``jumprelu``)."""

from __future__ import annotations

import torch

from lexica.train.architectures import SparseCode, TrainOutput, register
from lexica.train.architectures.parts import padded_code, threshold_code
from lexica.train.architectures.topk import TopK, TopKOptions
from lexica.train.shard import Shard, batch_threshold, total
from lexica.train.sparse import select_with_sparse_grad, sparse_pattern

THRESHOLD_MOMENTUM = 0.99


@register("batchtopk", TopKOptions)
class BatchTopK(TopK):
    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                 seed: int = 0, d_out: int | None = None, skip: bool = False, shard: Shard | None = None):
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, seed, d_out, skip, shard)
        # One threshold shared by all latents, stored per latent: the export's shape and the
        # state_dict's are the same, so exported weights load back directly. Negative = not yet set.
        self.register_buffer("threshold", torch.full((self.d_sae,), -1.0))

    def _select_batch(self, pre_activations: torch.Tensor):
        """(rows, latents, values) of the batch's top batch·k pre-activations, rows ascending."""
        values, flat = pre_activations.view(-1).topk(len(pre_activations) * self.k, sorted=False)
        flat, order = flat.sort()
        return flat // self.d_sae, flat % self.d_sae, values[order]

    def _encode_batch(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        """(centered x, rows, latents, values with encoder gradients, pattern, AuxK's source) of
        the batch-wide selection, the threshold tracked on the way."""
        centered = x - self.input_offset.detach()
        if self.in_chunks(len(x)):
            rows, latents, values, dead_winners = self._select_batch_in_chunks(centered, dead_mask)
        else:
            pre_activations = self.pre_activations(centered, reuse=True)
            rows, latents, values = self._select_batch(pre_activations)

            def dead_winners(aux_k: int):
                return self._dead_winners(centered, aux_k, dead_mask, pre_activations)
        self._track_threshold(values)
        pattern = sparse_pattern(rows, latents, len(x), self.d_sae)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.encoder_offset, values,
                                         pattern).relu()
        return centered, rows, latents, values, pattern, dead_winners

    @torch.no_grad()
    def _select_batch_in_chunks(self, centered: torch.Tensor, dead_mask: torch.Tensor | None):
        """The batch's top batch·k pre-activations over all shards, this shard's part of them as
        (rows, latents, values) with rows ascending, and AuxK's source; over row chunks: each chunk
        offers its own best batch·k (the batch's winners are among them)."""
        count = len(centered) * self.k
        offered_values, offered_flat = [], []

        def offer_best(rows: slice, pre_activations: torch.Tensor) -> None:
            values, flat = pre_activations.view(-1).topk(min(count, pre_activations.numel()), sorted=False)
            offered_values.append(values)
            offered_flat.append(flat + rows.start * self.d_sae)

        aux_k, aux_values, aux_latents = self._over_chunks(centered, dead_mask, offer_best)
        values, flat = torch.cat(offered_values), torch.cat(offered_flat)
        if len(values) > count:
            values, chosen = values.topk(count, sorted=False)
            flat = flat[chosen]
        if self.shard.sharded:  # the batch-wide threshold is global: keep what beats it here
            kept = values >= batch_threshold(values, count, self.shard)
            values, flat = values[kept], flat[kept]
        flat, order = flat.sort()

        def dead_winners(_: int):
            return self._winners(aux_values, aux_latents, aux_k)
        return flat // self.d_sae, flat % self.d_sae, values[order], dead_winners

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered, rows, latents, values, pattern, dead_winners = self._encode_batch(x, dead_mask)
        error = self.training_error(values, pattern, x, y)
        return self.losses(x, centered, error, padded_code(rows, latents, values, len(x)), dead_mask, variance,
                           dead_winners, y)

    @torch.no_grad()
    def _track_threshold(self, selected: torch.Tensor) -> None:
        positive = selected[selected > 0]
        smallest = positive.min() if len(positive) else torch.full((), float("inf"), device=selected.device)
        # The smallest over the shards (each holds the same after this), then averaged over the
        # data-parallel copies (over every worker: the shards of a copy agree).
        smallest = total(smallest, self.shard, torch.distributed.ReduceOp.MIN)
        smallest = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.AVG)
        if self.threshold[0] < 0:
            self.threshold.fill_(float(smallest))
        else:
            self.threshold.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * smallest)

    def encode_rows(self, x: torch.Tensor) -> SparseCode:
        """Per-token codes without a batch: every latent above the learned threshold."""
        return threshold_code(self.pre_activations(x - self.input_offset), self.threshold.clamp_min(0))

    def export_config(self) -> dict:
        return {"architecture": "jumprelu"}  # threshold inference is exactly a JumpReLU

    def export_extra(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.clamp_min(0).clone()}
