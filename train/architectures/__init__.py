"""Dictionary architectures as plugins: one file each, registered by name, one small interface.

Every architecture is an ``nn.Module`` with parameters ``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec`` and implements:

- ``initialise_from(batch)``: data-dependent initialisation from the first batch (b_dec at the mean);
- ``encode(x) -> SparseCode``: inference codes as (values, indices) of the active latents;
- ``decode(code) -> Tensor``: reconstruction;
- ``training_loss(x, dead_mask, variance) -> TrainOutput``: the loss to minimise and its terms
  (``forward`` is the same method, so DDP can wrap the module);
- ``begin_step(step, total_steps)``: schedules that follow training progress (e.g. a sparsity
  coefficient warm-up); a function of the step only, so a resumed run continues them exactly;
- ``before_optimizer_step()``: gradient constraints (e.g. keep decoder norms);
- ``after_step()``: constraints applied after the optimiser step (e.g. unit-norm decoder);
- ``export_config() -> dict``: the architecture's SAELens ``cfg.json`` fields;
- ``export_extra() -> dict[str, Tensor]``: weights beyond the four above (e.g. ``threshold``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ARCHITECTURES: dict[str, type] = {}


def register(name: str):
    def decorate(cls: type) -> type:
        ARCHITECTURES[name] = cls
        cls.architecture = name
        return cls

    return decorate


class SparseCode(NamedTuple):
    values: torch.Tensor  # [batch, k] activations of the chosen latents (zeros allowed)
    indices: torch.Tensor  # [batch, k] latent ids


class TrainOutput(NamedTuple):
    loss: torch.Tensor
    error: torch.Tensor  # reconstruction − input
    code: SparseCode | None  # None when the batch was decoded densely (e.g. early ReLU training)
    fvu: torch.Tensor
    terms: dict  # named loss terms, detached floats for metrics
    fired: torch.Tensor  # [d_sae] tokens of this batch each latent fired on


def build(name: str, **kwargs) -> torch.nn.Module:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; available: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)


# Each module registers itself on import.
from train.architectures import batchtopk, jumprelu, relu, topk  # noqa: E402,F401
