"""Dictionary architectures as plugins: one file each, registered by name, one small interface.

Every architecture is an ``nn.Module`` with parameters ``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec`` and implements:

- ``initialise_from(batch)``: data-dependent initialisation from the first batch (b_dec at the mean);
- ``encode_rows(x) -> SparseCode``: inference codes as (values, indices) of the active latents
  (``encode(x)``, from ``parts.Endpoints``, calls it over row chunks within the memory budget);
- ``decode(code) -> Tensor``: reconstruction;
- ``reconstruct(x) -> Tensor``: the output for input x (a skip-transcoder adds its linear path);
- ``training_loss(x, dead_mask, variance) -> TrainOutput``: the loss to minimise and its terms
  (``forward`` is the same method, so DDP can wrap the module);
- ``begin_step(step, total_steps)``: schedules that follow training progress (e.g. a sparsity
  coefficient warm-up); a function of the step only, so a resumed run continues them exactly;
- ``before_optimizer_step()``: gradient constraints (e.g. keep decoder norms);
- ``after_step()``: constraints applied after the optimiser step (e.g. unit-norm decoder);
- ``export_config() -> dict``: the architecture's SAELens ``cfg.json`` fields;
- ``export_extra() -> dict[str, Tensor]``: weights beyond the four above (e.g. ``threshold``).

An architecture declares its own options (``train.extra``) as a dataclass of knobs passed to
``register``; they are type- and range-checked with the rest of the config, before anything is
written, and docs/configuration.md lists them from that one source.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import torch

from lexica.config import from_dict
from lexica.errors import ConfigError

ARCHITECTURES: dict[str, type] = {}


@dataclasses.dataclass
class NoOptions:
    """An architecture without options of its own."""


def register(name: str, options: type = NoOptions):
    """Class decorator: the architecture ``name`` with its options dataclass (knobs with help)."""
    def decorate(cls: type) -> type:
        ARCHITECTURES[name] = cls
        cls.architecture = name
        cls.Options = options
        return cls

    return decorate


def check_ranges(checks: list[tuple[bool, str, Any, str]], architecture: str) -> None:
    """Refuse the first failed (ok, option, value, expected) check, naming the option."""
    for ok, option, value, expected in checks:
        if not ok:
            raise ConfigError(f"train.extra.{option} = {value!r} is invalid for {architecture}; expected {expected}")


def architecture_class(name: str) -> type:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; available: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def architecture_options(name: str, values: dict | None) -> Any:
    """``train.extra`` as the architecture's typed options: unknown keys, wrong types and values
    out of range are refused with the valid options named."""
    options_class = architecture_class(name).Options
    options = from_dict(options_class, values or {}, f"train.extra (options of {name})")
    if hasattr(options, "validate"):
        options.validate()
    return options


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


def transcodes(name: str) -> bool:
    """Whether architecture ``name`` can be a transcoder (read one hook point, write another)."""
    return "d_out" in inspect.signature(architecture_class(name).__init__).parameters


def build(name: str, d_in: int, d_sae: int, k: int = 1, aux_coefficient: float = 1 / 32, seed: int = 0,
          options: dict | None = None, d_out: int | None = None, skip: bool = False, shard=None) -> torch.nn.Module:
    """A new dictionary of architecture ``name``; ``options`` are its own (``train.extra``), validated.
    With ``d_out`` it is a transcoder writing d_out-wide outputs (with a linear skip path when
    ``skip``); with ``shard`` (``train.shard.Shard``) only that shard's slice of the latents."""
    typed = architecture_options(name, options)
    transcoder = {"d_out": d_out, "skip": skip} if d_out is not None else {}
    if transcoder and not transcodes(name):
        raise ConfigError(f"architecture {name!r} cannot be a transcoder yet; transcoders are "
                          f"{', '.join(sorted(n for n in ARCHITECTURES if transcodes(n)))}")
    return architecture_class(name)(d_in=d_in, d_sae=d_sae, k=k, aux_coefficient=aux_coefficient, seed=seed,
                                    **dataclasses.asdict(typed), **transcoder, shard=shard)


# Each module registers itself on import.
from lexica.train.architectures import batchtopk, jumprelu, matryoshka, relu, topk  # noqa: E402,F401
