"""Typed configuration of the harvest stage, loaded from YAML and/or command-line flags.

Each field's ``help`` metadata is the single description of a knob: it feeds ``--help`` and
the README's configuration reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def knob(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's vocabulary
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str = knob("", "local folder or Hugging Face hub id of a transformers causal LM")
    revision: str | None = knob(None, "hub revision (branch, tag or commit) when path is a hub id")
    dtype: str = knob("float32", "dtype the model runs in: float32, bfloat16 or float16")
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    trust_remote_code: bool = knob(False, "allow model code from the hub (off: safer)")


@dataclass
class CorpusConfig:
    paths: list[str] = knob([], "corpus files, folders or globs (.txt, .jsonl, .parquet; any fsspec URL)")
    dataset: str | None = knob(None, "a Hugging Face datasets name or saved-dataset folder, instead of paths")
    dataset_config: str | None = knob(None, "datasets configuration name")
    split: str = knob("train", "datasets split")
    text_field: str = knob("text", "field/column holding the document text (.jsonl, .parquet, datasets)")
    docs_per_shard: int = knob(64, "documents per shard: the unit of work, commit and resume")
    max_documents: int | None = knob(None, "use only the first N documents of the corpus")
    invalid_utf8: str = knob("skip", "a document that is not valid UTF-8: skip (counted, logged) or fail")


@dataclass
class WorkersConfig:
    actors: int = knob(1, "harvest actors (each holds one model copy; one per GPU); 0 runs in-process without Ray")
    cpus_per_actor: float = knob(1.0, "CPUs reserved per actor (fractions allowed)")
    gpus_per_actor: float | None = knob(None, "GPUs per actor; default 1 when the cluster has GPUs, else 0")
    torch_threads: int | None = knob(None, "torch intra-op threads per actor (default: max(1, cpus_per_actor))")
    max_attempts: int = knob(3, "attempts per shard before the harvest gives up (actor deaths)")


@dataclass
class RayConfig:
    address: str | None = knob(None, "Ray cluster address; default RAY_ADDRESS, else an embedded local Ray")
    num_cpus: int | None = knob(None, "CPUs of the embedded local Ray (default: all cores)")


@dataclass
class HarvestConfig:
    run: str = knob("./runs/demo", "run folder URL (local path, file://, s3://...)")
    model: ModelConfig = field(default_factory=ModelConfig)
    hook: str = knob("resid_post.middle",
                     "hook point: resid_post.L, resid_pre.L, mlp_out.L, attn_out.L (L may be 'middle')")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    context_length: int = knob(1024, "tokens per context window; longer documents are split into windows")
    bos: str = knob("auto", "prepend the tokenizer's BOS to every window: auto (if it has one), always, never")
    store_dtype: str = knob("float16", "dtype of stored activations: float16 or bfloat16")
    batch_tokens: int = knob(8192, "tokens per forward batch (windows are grouped by length to limit padding)")
    row_group_mb: int = knob(64, "MiB of activations per Parquet row group")
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage_options: dict = knob({}, "fsspec options for the run URL, e.g. {endpoint_url: ...}; never credentials")
    overwrite: bool = knob(False, "replace an existing store made with a different configuration")
    progress_seconds: float = knob(5.0, "seconds between progress lines")

    def validate(self) -> HarvestConfig:
        for name, annotation in field_types(HarvestConfig).items():
            check_type(_get(self, name), annotation, name)
        if not self.model.path:
            raise ConfigError("model.path is required (a local folder or hub id; --model)")
        if not self.corpus.paths and not self.corpus.dataset:
            raise ConfigError("corpus needs paths or a dataset (--corpus FILES_OR_DATASET)")
        if self.corpus.paths and self.corpus.dataset:
            raise ConfigError("corpus has both paths and dataset; give one")
        checks = [
            (self.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32, bfloat16 or float16"),
            (self.store_dtype in ("float16", "bfloat16"), "store_dtype", "float16 or bfloat16"),
            (self.bos in ("auto", "always", "never"), "bos", "auto, always or never"),
            (self.corpus.invalid_utf8 in ("skip", "fail"), "corpus.invalid_utf8", "skip or fail"),
            (self.context_length >= 2, "context_length", "an integer >= 2"),
            (self.batch_tokens >= self.context_length, "batch_tokens", f">= context_length ({self.context_length})"),
            (self.corpus.docs_per_shard >= 1, "corpus.docs_per_shard", ">= 1"),
            (self.workers.actors >= 0, "workers.actors", ">= 1 (or 0: run in this process without Ray)"),
            (self.workers.max_attempts >= 1, "workers.max_attempts", ">= 1"),
            (self.row_group_mb >= 1, "row_group_mb", ">= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"{name} = {_get(self, name)!r} is invalid; expected {expected}")
        return self


def _get(obj: Any, dotted: str) -> Any:
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
          "list[str]": ((list,), "a list of strings")}


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


def harvest_config_from_file(url: str) -> HarvestConfig:
    return from_dict(HarvestConfig, stage_section(url, "harvest"), f"{url}: harvest")


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


def add_knob_flags(parser: Any, cls: type, stage: str, flags: dict[str, str]) -> None:
    """``--config``, one flag per entry of ``flags`` (argparse dest → dotted knob, its help from the
    knob) and ``--set KEY=VALUE``: the options every stage CLI shares."""
    helps = {name: text for name, _, text in field_help(cls)}
    parser.add_argument("--config", help=f"YAML pipeline config; its '{stage}:' section (flags override it)")
    for flag, target in flags.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=helps.get(target, ""))
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
    """(dotted name, default, help) of every knob, for --help and the README reference."""
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
