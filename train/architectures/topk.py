"""TopK dictionary with AuxK for dead latents (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): keep the k largest pre-activations, unit-norm decoder rows, and an auxiliary loss
that lets dead latents model the residual error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lexica.config import knob
from lexica.errors import ConfigError
from lexica.train.architectures import SparseCode, TrainOutput, check_ranges, register
from lexica.train.architectures.parts import (
    Endpoints,
    firing_counts,
    fraction_of_variance_unexplained,
    normalise_rows,
    padded_code,
    reconstruction_loss,
    remove_parallel_gradient,
    sum_of_squares,
)
from lexica.train.selection import topk_rows
from lexica.train.shard import Shard, total, winners_per_row
from lexica.train.sparse import decode_code, fixed_k_pattern, select_with_sparse_grad, sparse_decode, sparse_pattern


@dataclass
class TopKOptions:
    aux_k: int | None = knob(None, "dead latents the AuxK loss may use per token (default max(k, d_in/2), at most "
                                   "the width)")

    def validate(self) -> None:
        check_ranges([(self.aux_k is None or self.aux_k >= 1, "aux_k", self.aux_k, ">= 1 or null")], "topk")


@register("topk", TopKOptions)
class TopK(Endpoints):
    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                 seed: int = 0, d_out: int | None = None, skip: bool = False, shard: Shard | None = None):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ConfigError(f"k = {k} is out of range; expected 1..d_sae ({d_sae})")
        self.k = k
        self.aux_k = aux_k if aux_k is not None else min(d_sae, max(k, d_in // 2))
        self.aux_coefficient = aux_coefficient
        self.init_weights(d_in, d_sae, seed, d_out=d_out, skip=skip, shard=shard)

    def initialise_from(self, batch: torch.Tensor) -> None:
        self.initialise_offsets(batch)

    def pre_activations(self, centered: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """The dense encoder matmul, outside autograd (gradients come from the sparse kernels).

        With ``reuse`` the result goes into one buffer kept across steps (valid until the next
        call): a fresh [batch, d_sae] tensor every step costs as much as the matmul itself here,
        in page faults on newly mapped memory."""
        with torch.no_grad():
            if not reuse:
                return self.encoder_product(centered)
            dtype = self.compute_dtype if centered.dtype == torch.float32 else centered.dtype
            buffer = getattr(self, "_pre_activation_buffer", None)
            if buffer is None or len(buffer) < len(centered) or buffer.shape[1] != self.d_sae \
                    or buffer.dtype != dtype or buffer.device != centered.device:
                buffer = self._pre_activation_buffer = torch.empty((len(centered), self.d_sae), dtype=dtype,
                                                                   device=centered.device)
            # The first rows of a contiguous buffer: a row chunk of any size reuses the same memory.
            return self.encoder_product(centered, out=buffer[:len(centered)])

    def _select(self, centered: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                pre_activations: torch.Tensor | None = None):
        """Top-k latents per row; ``pre_activations`` (consumed: masked in place) saves the matmul."""
        if pre_activations is None:
            pre_activations = self.pre_activations(centered)
        if mask is not None:
            pre_activations.masked_fill_(~mask, float("-inf"))
        return topk_rows(pre_activations, k)

    def encode_rows(self, x: torch.Tensor) -> SparseCode:
        values, indices = self._select(x - self.input_offset, self.k)
        return SparseCode(values.relu(), indices)

    def decode(self, code: SparseCode) -> torch.Tensor:
        return decode_code(code.indices, code.values, self.W_dec) + self.b_dec

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered = x - self.input_offset.detach()
        if self.in_chunks(len(x)):
            return self._training_loss_in_chunks(x, y, centered, dead_mask, variance)
        pre_activations = self.pre_activations(centered, reuse=True)
        values, indices = self._select(centered, self.k, pre_activations=pre_activations)
        pattern = fixed_k_pattern(indices, self.d_sae)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.input_offset, values, pattern).relu()
        error = self.with_skip(sparse_decode(values, self.W_dec, pattern, self.b_dec, target=y), x)
        return self.losses(x, centered, error, SparseCode(values, indices), dead_mask, variance,
                           lambda aux_k: self._dead_winners(centered, aux_k, dead_mask, pre_activations), y)

    def in_chunks(self, rows: int) -> bool:
        """Whether the step selects over row chunks and exchanges candidates: always for a shard,
        and for a whole dictionary whose [rows, d_sae] pre-activations exceed the memory budget."""
        return self.shard.sharded or self.over_budget(rows)

    @torch.no_grad()
    def _over_chunks(self, centered: torch.Tensor, dead_mask: torch.Tensor | None, each_chunk) -> tuple:
        """Run ``each_chunk(rows, pre_activations)`` over row chunks within the memory budget, so no
        [batch, d_sae] tensor beyond it exists, keeping on the way AuxK's candidates: per row, this
        shard's best dead latents, padded with -inf to the whole dictionary's AuxK count. Returns
        (that count, the candidates' values, their latents)."""
        rows = len(centered)
        aux_k = min(self.aux_k, self._dead_count(dead_mask))
        dead_latents = dead_mask.nonzero().view(-1) if aux_k else None
        aux_values = centered.new_full((rows, aux_k), float("-inf"))
        aux_latents = torch.zeros(rows, aux_k, dtype=torch.long, device=centered.device)
        local_aux = min(aux_k, len(dead_latents)) if aux_k else 0
        step = self.chunk_rows(rows)
        for start in range(0, rows, step):
            chunk = slice(start, min(rows, start + step))
            pre_activations = self.pre_activations(centered[chunk], reuse=True)
            if local_aux:
                dead = pre_activations.index_select(1, dead_latents)
                if local_aux < len(dead_latents):
                    dead, columns = topk_rows(dead, local_aux)
                    aux_latents[chunk, :local_aux] = dead_latents[columns]
                else:
                    aux_latents[chunk, :local_aux] = dead_latents
                aux_values[chunk, :local_aux] = dead
            each_chunk(chunk, pre_activations)
        return aux_k, aux_values, aux_latents

    def _winners(self, values: torch.Tensor, latents: torch.Tensor, k: int):
        """(rows ascending, local latents, values) of each row's ``k`` winners that this shard
        holds, from every shard's candidates (a whole dictionary's candidates are the winners)."""
        if self.shard.sharded:
            return winners_per_row(values, latents, k, self.shard)
        rows = torch.arange(len(values), device=values.device).repeat_interleave(values.shape[1])
        return rows, latents.reshape(-1), values.reshape(-1)

    def _dead_count(self, dead_mask: torch.Tensor | None) -> int:
        """Dead latents of the whole dictionary (all shards)."""
        if dead_mask is None:
            return 0
        return int(total(dead_mask.sum(), self.shard))

    def _training_loss_in_chunks(self, x, y, centered, dead_mask, variance) -> TrainOutput:
        count = min(self.k, self.d_sae)  # each shard's candidates per token
        values = centered.new_empty(len(x), count)
        latents = torch.empty(len(x), count, dtype=torch.long, device=x.device)

        def keep_best(rows: slice, pre_activations: torch.Tensor) -> None:
            values[rows], latents[rows] = topk_rows(pre_activations, count)

        aux_k, aux_values, aux_latents = self._over_chunks(centered, dead_mask, keep_best)
        rows, latents, values = self._winners(values, latents, self.k)
        pattern = sparse_pattern(rows, latents, len(x), self.d_sae)
        values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.encoder_offset, values, pattern).relu()
        error = self.training_error(values, pattern, x, y)
        return self.losses(x, centered, error, padded_code(rows, latents, values, len(x)), dead_mask, variance,
                           lambda _: self._winners(aux_values, aux_latents, aux_k), y)

    def losses(self, x, centered, error, code: SparseCode, dead_mask, variance, dead_winners,
               target: torch.Tensor | None = None) -> TrainOutput:
        """Reconstruction loss plus AuxK from the reconstruction ``error`` of ``target`` (the input
        itself for an autoencoder); ``code`` may be padded with zero values; ``dead_winners(aux_k)``
        gives AuxK's (rows, latents, values) of this shard, from the step's own pre-activations."""
        loss, fvu = reconstruction_loss(error, self.shifted_target(target, centered), variance)
        auxk = self._auxk(centered, error, dead_mask, fvu, variance, dead_winners)
        loss = loss + self.aux_coefficient * auxk.nan_to_num(0.0)
        fired = firing_counts(code.indices, code.values.detach(), self.d_sae)
        return TrainOutput(loss, error, code, fvu,
                           {"fvu": float(fvu.detach()), "auxk": float(auxk.detach()),
                            "l0": float(total(fired.sum(), self.shard)) / len(x)}, fired)

    def _auxk(self, centered, error, dead_mask, fvu, variance, dead_winners) -> torch.Tensor:
        """AuxK: dead latents try to explain what the live ones miss (the residual), which pulls
        them back into use without disturbing the main reconstruction."""
        dead_count = self._dead_count(dead_mask)
        if not dead_count:
            return torch.zeros((), device=error.device)
        rows, latents, aux_values = dead_winners(min(self.aux_k, dead_count))
        aux_pattern = sparse_pattern(rows, latents, len(centered), self.d_sae)
        aux_values = select_with_sparse_grad(centered, self.W_enc, self.b_enc, self.encoder_offset, aux_values,
                                             aux_pattern).relu()
        residual = -error.detach()
        if self.shard.sharded:
            aux_error = self.summed(sparse_decode(aux_values, self.W_dec, aux_pattern)) - residual
        else:
            aux_error = sparse_decode(aux_values, self.W_dec, aux_pattern, target=residual)
        if variance is None:
            return fraction_of_variance_unexplained(aux_error, residual)
        return sum_of_squares(aux_error) / len(aux_error) / (variance * float(fvu.detach()) + 1e-12)

    def _dead_winners(self, centered, aux_k: int, dead_mask: torch.Tensor, pre_activations: torch.Tensor):
        """(rows, latents, values) of the top ``aux_k`` dead latents of each row of a whole
        dictionary's batch, from its ``pre_activations`` (which it may overwrite)."""
        values, latents = self._select_dead(centered, aux_k, dead_mask, pre_activations)
        rows = torch.arange(len(values), device=values.device).repeat_interleave(values.shape[1])
        # contiguous: latents broadcast over rows reshape to a stride-0 view, which embedding_bag misreads
        return rows, latents.reshape(-1).contiguous(), values.reshape(-1)

    def _select_dead(self, centered, aux_k: int, dead_mask: torch.Tensor, pre_activations: torch.Tensor):
        """The top ``aux_k`` dead latents of each row. Usually few latents are dead: their columns
        are gathered and selected among (all of them, when they are no more than ``aux_k``), not a
        top-k over the full width with every live latent masked out; with most latents dead the
        masked full-width selection is cheaper (it overwrites ``pre_activations``)."""
        dead_latents = dead_mask.nonzero().view(-1)
        if 2 * len(dead_latents) > self.d_sae:
            return self._select(centered, aux_k, dead_mask.unsqueeze(0), pre_activations)
        dead_pre_activations = pre_activations.index_select(1, dead_latents)  # [batch, dead]
        if aux_k == len(dead_latents):
            return dead_pre_activations, dead_latents.expand_as(dead_pre_activations)
        values, columns = topk_rows(dead_pre_activations, aux_k)
        return values, dead_latents[columns]

    def forward(self, x, dead_mask=None, variance=None) -> TrainOutput:
        return self.training_loss(x, dead_mask, variance)  # late-bound: subclasses change the loss

    def begin_step(self, step: int, total_steps: int) -> None:
        pass  # nothing follows the schedule: k is fixed from the first step

    def before_optimizer_step(self) -> None:
        remove_parallel_gradient(self.W_dec)

    def after_step(self) -> None:
        normalise_rows(self.W_dec)

    def export_config(self) -> dict:
        return {"architecture": "topk", "k": self.k}

    def export_extra(self) -> dict[str, torch.Tensor]:
        return {}
