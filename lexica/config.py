"""Typed configuration for every stage: knobs, loading YAML, flags and ``--set`` overrides.

A stage's config is a dataclass of ``knob(default, help)`` fields. Each knob's help is the single
description of it: it feeds ``--help`` and the configuration reference in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

import yaml

from lexica.errors import ConfigError


def knob(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def from_dict(cls: type, values: dict, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys with the valid ones listed."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{where}.{name}")
        else:
            check_type(value, str(fields[name].type), f"{where}.{name}")
            kwargs[name] = value
    return cls(**kwargs)


# Annotation → (accepted Python types, words for the error message). A wrong type caught here is
# an error naming the key; caught nowhere it is a TypeError deep inside validate() or the harvest.
_TYPES = {"str": ((str,), "a string"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "true or false"), "dict": ((dict,), "a mapping"), "None": ((type(None),), "null"),
          "list[str]": ((list,), "a list of strings"), "list[int]": ((list,), "a list of integers")}


def check_type(value: Any, annotation: str, where: str) -> None:
    """Refuse a value of the wrong type for a knob annotated ``annotation`` (e.g. ``int | None``)."""
    options = [option.strip() for option in annotation.split("|")]
    if any(option not in _TYPES for option in options):
        return  # an annotation this checker does not know: trust the value
    for option in options:
        accepted, _ = _TYPES[option]
        if isinstance(value, bool) and bool not in accepted:
            continue  # bool is an int subclass, but `true` is no context length
        if isinstance(value, accepted):
            if option == "list[str]" and not all(isinstance(item, str) for item in value):
                continue
            if option == "list[int]" and not all(isinstance(item, int) and not isinstance(item, bool)
                                                 for item in value):
                continue
            return
    expected = " or ".join(_TYPES[option][1] for option in options)
    hint = " (quote it in YAML to keep it a string)" if "str" in options and isinstance(value, (int, float)) else ""
    raise ConfigError(f"{where} = {value!r} is invalid; expected {expected}{hint}")


def field_types(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted name → annotation of every knob, e.g. ``{"model.revision": "str | None", ...}``."""
    types: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            types.update(field_types(type(default), f"{prefix}{f.name}."))
        else:
            types[prefix + f.name] = str(f.type)
    return types


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_yaml(url: str) -> dict:
    import fsspec

    try:
        with fsspec.open(url, "r", encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    except FileNotFoundError as error:
        raise ConfigError(f"config file {url} does not exist") from error
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {url} is not valid YAML: {error}") from error
    if not isinstance(document, dict):
        raise ConfigError(f"{url}: top level must be a mapping")
    return document


def stage_section(url: str, stage: str) -> dict:
    """One stage's section of a pipeline config, with the shared ``run``/``storage_options`` keys."""
    document = load_yaml(url)
    section = dict(document.get(stage) or {})
    for shared_key in ("run", "storage_options"):
        if shared_key in document and shared_key not in section:
            section[shared_key] = document[shared_key]
    return section


def assign_dotted(cls: type, values: dict, dotted: str, value) -> None:
    """Set ``values[a][b] = value`` for ``dotted`` = "a.b" (a --set / flag override)."""
    *parents, leaf = dotted.split(".")
    for depth, parent in enumerate(parents):
        values = values.setdefault(parent, {})
        if not isinstance(values, dict):
            section = ".".join(parents[:depth + 1])
            raise ConfigError(f"cannot set {dotted}: {section} is a value, not a section; "
                              f"valid keys: {sorted(field_types(cls))}")
    values[leaf] = value


def add_knob_flags(parser: Any, cls: type, stage: str, flags: dict[str, str],
                   notes: dict[str, str] | None = None) -> None:
    """``--config``, one flag per entry of ``flags`` (argparse dest → dotted knob, its help from the
    knob, plus ``notes[flag]`` such as what a default resolves to here) and ``--set KEY=VALUE``:
    the options every stage CLI shares."""
    helps = {name: text for name, _, text in field_help(cls)}
    parser.add_argument("--config", help=f"YAML pipeline config; its '{stage}:' section (flags override it)")
    for flag, target in flags.items():
        note = (notes or {}).get(flag)
        help_text = helps.get(target, "") + (f" [{note}]" if note else "")
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=help_text.replace("%", "%%"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"set any {stage} knob")


def apply_overrides(cls: type, values: dict, args: Any, flags: dict[str, str], assignments: list[str]) -> dict:
    """Command-line overrides of a config mapping: each flag of ``flags`` (argparse dest → dotted
    knob) that was given, then each ``--set KEY=VALUE``. String knobs take a flag verbatim (YAML
    would turn a revision like 0123 into 83); other values are parsed as YAML."""
    types = field_types(cls)
    for flag, target in flags.items():
        value = getattr(args, flag)
        if value is not None:
            if not types[target].startswith("str"):
                value = parse_yaml_value(value, "--" + flag.replace("_", "-"))
            assign_dotted(cls, values, target, value)
    for assignment in assignments:
        key, separator, raw = assignment.partition("=")
        if not separator:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
        assign_dotted(cls, values, key.strip(), parse_yaml_value(raw, f"--set {key.strip()}"))
    return values


def parse_yaml_value(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{where}: {text!r} is not a valid YAML value ({problem})") from error


def field_help(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) of every knob, for --help and docs/configuration.md."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = f.default
        if dataclasses.is_dataclass(default):
            rows.extend(field_help(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows


def stage_config(cls: type, stage: str, config: Any = None, knobs: dict | None = None) -> Any:
    """A stage's config for Python callers: ``config`` (a pipeline YAML path, a mapping of the
    stage's keys, an instance of ``cls`` or None) with ``knobs`` (keyword arguments, nested
    sections as mappings) laid over it, checked as the command line checks its flags."""
    if isinstance(config, cls):
        values = to_dict(config)
    elif isinstance(config, str):
        values = stage_section(config, stage)
    elif config is None or isinstance(config, dict):
        values = dict(config or {})
    else:
        raise ConfigError(f"{stage} config must be a YAML path, a mapping or a {cls.__name__}, "
                          f"got {type(config).__name__}")
    return from_dict(cls, _deep_merge(values, knobs or {}), stage)


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
