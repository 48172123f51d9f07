"""Matryoshka BatchTopK (Bussmann et al. 2025, "Learning multi-level features with Matryoshka
sparse autoencoders"; Nabeshima 2024): the latents are ordered, and every prefix of them — the
first m₁, the first m₂, …, all of them — must reconstruct the input on its own; the losses of the
prefixes are summed. Early latents are pushed toward general, frequent features and later ones
toward refinements, which counters feature absorption (a general latent losing its cases to more
specific ones). Selection is BatchTopK's over the whole width; so are inference (a threshold) and
the export (SAELens ``jumprelu``, as SAELens itself saves its Matryoshka dictionaries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lexica.config import knob
from lexica.train.architectures import TrainOutput, check_ranges, register
from lexica.train.architectures.batchtopk import BatchTopK
from lexica.train.architectures.parts import padded_code, reconstruction_loss
from lexica.train.shard import Shard
from lexica.train.sparse import sparse_decode, sparse_pattern

DEFAULT_LEVELS = 5  # prefixes of 1/16, 1/8, 1/4, 1/2 of the width, then all of it


@dataclass
class MatryoshkaOptions:
    aux_k: int | None = knob(None, "dead latents the AuxK loss may use per token (default max(k, d_in/2), at most "
                                   "the width)")
    prefixes: list[int] | None = knob(None, "latent counts of the nested prefixes, ascending; the full width is "
                                            "added if missing (default: 1/16, 1/8, 1/4, 1/2 of the width)")

    def validate(self) -> None:
        prefixes = self.prefixes
        check_ranges([(self.aux_k is None or self.aux_k >= 1, "aux_k", self.aux_k, ">= 1 or null"),
                      (prefixes is None or (len(prefixes) > 0 and all(size >= 1 for size in prefixes)
                                            and prefixes == sorted(set(prefixes))),
                       "prefixes", prefixes, "ascending distinct latent counts >= 1, or null")], "matryoshka")


def prefix_sizes(d_sae: int, prefixes: list[int] | None) -> list[int]:
    """The prefix sizes, ascending, ending with the full width."""
    if prefixes is None:
        prefixes = [max(1, d_sae >> shift) for shift in range(DEFAULT_LEVELS - 1, 0, -1)]
    sizes = sorted({size for size in prefixes if size < d_sae} | {d_sae})
    if any(size > d_sae for size in prefixes):
        from lexica.errors import ConfigError

        raise ConfigError(f"train.extra.prefixes = {prefixes} has a prefix wider than the dictionary ({d_sae} "
                          "latents)")
    return sizes


@register("matryoshka", MatryoshkaOptions)
class Matryoshka(BatchTopK):
    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, prefixes: list[int] | None = None,
                 aux_coefficient: float = 1 / 32, seed: int = 0, d_out: int | None = None, skip: bool = False,
                 shard: Shard | None = None):
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, seed, d_out, skip, shard)
        self.prefixes = prefix_sizes(d_sae, prefixes)

    def training_loss(self, batch: torch.Tensor, dead_mask: torch.Tensor | None = None,
                      variance: float | None = None) -> TrainOutput:
        x, y = self.split(batch)
        centered, rows, latents, values, _, dead_winners = self._encode_batch(x, dead_mask)
        shifted_target = self.shifted_target(y, centered)
        # Each level's pairs decode on their own; a prefix's error is the previous prefix's plus them.
        # Levels are of the whole dictionary's latents: a shard's start at its offset.
        level = torch.bucketize(latents + self.shard.start, torch.tensor(self.prefixes[:-1], device=latents.device),
                                right=True)
        error, prefix_losses = None, []
        for index in range(len(self.prefixes)):
            chosen = level == index
            part = sparse_pattern(rows[chosen], latents[chosen], len(x), self.d_sae)
            if error is None:
                error = self.training_error(values[chosen], part, x, y)
            else:
                error = error + self.summed(sparse_decode(values[chosen], self.W_dec, part))
            if index < len(self.prefixes) - 1:
                prefix_losses.append(reconstruction_loss(error, shifted_target, variance)[0])
        output = self.losses(x, centered, error, padded_code(rows, latents, values, len(x)), dead_mask, variance,
                             dead_winners, y)  # the full width's loss, AuxK and metrics
        prefix_loss = torch.stack(prefix_losses).sum() if prefix_losses else torch.zeros((), device=x.device)
        return output._replace(loss=output.loss + prefix_loss,
                               terms={**output.terms, "prefix_loss": float(prefix_loss.detach())})

    def export_config(self) -> dict:
        return {**super().export_config(), "lexica_matryoshka_prefixes": self.prefixes}
