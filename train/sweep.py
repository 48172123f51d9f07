"""Sweeps: many dictionaries trained in one job from one read of the store.

``train.sweep`` is a list of variants (mappings of the knobs below over the rest of the config)
or a grid (a mapping of knob → list of values, expanded to every combination). Every variant
shares what the data stream depends on (store, batch size, tokens, data seed and lanes, workers),
so each batch is read, shuffled and normalised once and given to every dictionary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

from lexica.config import check_type, field_types
from lexica.errors import ConfigError
from lexica.train.config import TrainConfig

# What may differ between the dictionaries of one job. Everything else is the job's: the data
# stream, the workers, the evaluation. A variant's seed sets its initialisation (and resampling);
# the order of the data follows the job's seed, so every variant sees the same batches.
VARIANT_KNOBS = ("name", "architecture", "width", "k", "lr", "seed", "optimizer", "schedule", "momentum",
                 "lr_warmup_steps", "lr_decay_fraction", "dead_tokens", "aux_coefficient", "resample_every", "skip",
                 "extra")

# Knobs already in the default name <architecture>-<hook>[-to-<target>[-skip]]-<width>-k<k>.
_NAMED = ("name", "architecture", "width", "k", "skip")


def sweep_variants(config: TrainConfig) -> list[dict]:
    """The sweep's variants (a grid expanded), each checked: only per-dictionary knobs, each of its
    knob's type; [] without a sweep."""
    if not config.sweep:
        return []
    variants = _variants(config.sweep)
    types = field_types(TrainConfig)
    for index, variant in enumerate(variants):
        for key, value in variant.items():
            if key not in VARIANT_KNOBS:
                what = "shared by every dictionary of a sweep (one read of the store)" if key in types else "unknown"
                raise ConfigError(f"train.sweep[{index}].{key}: {key!r} is {what}; a variant may set "
                                  f"{', '.join(VARIANT_KNOBS)}")
            check_type(value, types[key], f"train.sweep[{index}].{key}")
    return variants


def apply_variant(config: TrainConfig, variant: dict) -> TrainConfig:
    """The job's config with one variant's knobs over it (its ``extra`` merged over the job's). The
    job's ``name`` names the sweep, not the variant."""
    return dataclasses.replace(config, **{**variant, "name": variant.get("name"), "sweep": [],
                                          "extra": {**config.extra, **variant.get("extra", {})}})


def variant_suffix(variant: dict) -> str:
    """What a variant without a name adds to the default name: each knob it sets that the default
    name does not already show, e.g. ``-lr0.002-seed1``."""
    if "name" in variant:
        return ""
    parts = []
    for key in VARIANT_KNOBS:
        if key in variant and key not in _NAMED:
            options = variant[key] if key == "extra" else {key: variant[key]}  # extra: its own options
            parts += [f"-{option.replace('_', '')}{_short(value)}" for option, value in options.items()]
    return "".join(parts)


def _short(value) -> str:
    if isinstance(value, list):
        return "_".join(_short(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _variants(sweep) -> list[dict]:
    if isinstance(sweep, dict):  # a grid: every combination, in the order the keys were given
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"train.sweep.{key} = {values!r} is invalid; a grid maps each knob to a non-empty "
                                  "list of values")
        return [dict(zip(sweep, combination, strict=True)) for combination in itertools.product(*sweep.values())]
    if not isinstance(sweep, list) or not sweep or not all(isinstance(variant, dict) for variant in sweep):
        raise ConfigError(f"train.sweep = {sweep!r} is invalid; expected a list of variants (mappings of knobs) or a "
                          "grid (a mapping of knob to a list of values)")
    return [dict(variant) for variant in sweep]


def sweep_name(config: TrainConfig, names: list[str], hook: str) -> str:
    """The job's name (its checkpoint folder): ``train.name`` when given, else one derived from the
    dictionaries' names, so re-running the same sweep resumes it and a different one starts afresh."""
    if config.name:
        return config.name
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    return f"sweep-{hook}-{len(names)}x-{digest}"
