"""Typed configuration of the harvest stage, loaded from YAML and/or command-line flags.

Each field's ``help`` metadata is the single description of a knob: it feeds ``--help`` and
the configuration reference (docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lexica.config import ConfigError, check_type, field_types, from_dict, get_dotted, knob, stage_section
from lexica.models import ModelConfig


@dataclass
class CorpusConfig:
    paths: list[str] = knob([], "corpus files, folders or globs (.txt, .jsonl, .parquet, .txt.gz, .jsonl.gz, "
                            ".jsonl.zst, .txt.zst; any fsspec URL)")
    dataset: str | None = knob(None, "a Hugging Face datasets name or saved-dataset folder, instead of paths")
    dataset_config: str | None = knob(None, "datasets configuration name")
    split: str = knob("train", "datasets split")
    text_field: str = knob("text", "field/column holding the document text (.jsonl, .parquet, datasets)")
    streaming: bool = knob(False, "read the dataset as a stream (datasets' streaming mode): no length needed")
    shard_tokens: int | None = knob(None, "tokens per shard, the unit of work, commit and resume; long documents "
                                    "are split between shards at window boundaries (default: the corpus's "
                                    "estimated tokens / 64, within 16k..1M)")
    docs_per_shard: int | None = knob(None, "documents per shard instead of shard_tokens")
    max_documents: int | None = knob(None, "use only the first N documents of the corpus")
    max_tokens: int | None = knob(None, "use only the first N tokens of the corpus (the last document is cut)")
    invalid_utf8: str = knob("skip", "a document that is not valid UTF-8: skip (counted, logged) or fail")


@dataclass
class WorkersConfig:
    actors: int | None = knob(None, "harvest actors, each holding one model copy (default: one per GPU; without "
                              "GPUs, one per 8 CPUs of each node); 0 runs in-process without Ray")
    cpus_per_actor: float | None = knob(None, "CPUs reserved per actor, fractions allowed (default: an equal "
                                        "share of the node's or the GPU's CPUs)")
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
                     "hook point(s), comma-separated, all from one forward pass: resid_post.L, resid_pre.L, "
                     "mlp_in.L, mlp_out.L, attn_out.L; L is a layer, 'middle', a range FIRST-LAST or 'all' "
                     "(one store per hook point)")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    context_length: int = knob(1024, "tokens per context window; longer documents are split into windows")
    bos: str = knob("auto", "prepend the tokenizer's BOS to every window: auto (if it has one), always, never")
    store_dtype: str = knob("float16", "dtype of stored activations: float16 or bfloat16")
    store_format: int = knob(1, "store layout: 1 (plain 2-byte values, fastest to read) or 2 (byte planes with "
                             "zstd: ~1.73 bytes per value; docs/store-format.md)")
    batch_tokens: int = knob(8192, "tokens per forward batch (windows are grouped by length to limit padding)")
    row_group_mb: int = knob(64, "MiB of activations per Parquet row group")
    max_buffer_bytes: int = knob(2 << 30, "bytes of activations an actor may hold awaiting their write, over "
                                 "all hook points; many hooks get smaller row groups and forward batches")
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage_options: dict = knob({}, "fsspec options for the run URL, e.g. {endpoint_url: ...}; never credentials")
    overwrite: bool = knob(False, "replace an existing store made with a different configuration")
    progress_seconds: float = knob(5.0, "seconds between progress lines")

    def validate(self) -> HarvestConfig:
        for name, annotation in field_types(HarvestConfig).items():
            check_type(get_dotted(self, name), annotation, name)
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
            (self.store_format in (1, 2), "store_format", "1 or 2"),
            (self.corpus.invalid_utf8 in ("skip", "fail"), "corpus.invalid_utf8", "skip or fail"),
            (self.context_length >= 2, "context_length", "an integer >= 2"),
            (self.batch_tokens >= self.context_length, "batch_tokens", f">= context_length ({self.context_length})"),
            (self.corpus.docs_per_shard is None or self.corpus.docs_per_shard >= 1, "corpus.docs_per_shard",
             ">= 1"),
            (self.corpus.shard_tokens is None or self.corpus.shard_tokens >= self.context_length,
             "corpus.shard_tokens", f">= context_length ({self.context_length})"),
            (self.corpus.shard_tokens is None or self.corpus.docs_per_shard is None, "corpus.shard_tokens",
             "unset when corpus.docs_per_shard is set (give one)"),
            (self.corpus.max_tokens is None or self.corpus.max_tokens >= 1, "corpus.max_tokens", ">= 1"),
            (self.corpus.max_documents is None or self.corpus.max_documents >= 1, "corpus.max_documents", ">= 1"),
            (not self.corpus.streaming or bool(self.corpus.dataset), "corpus.streaming",
             "false for corpus files (compressed files are streamed anyway); true needs corpus.dataset"),
            (self.workers.actors is None or self.workers.actors >= 0, "workers.actors",
             ">= 1 (or 0: run in this process without Ray)"),
            (self.workers.cpus_per_actor is None or self.workers.cpus_per_actor > 0, "workers.cpus_per_actor", "> 0"),
            (self.workers.max_attempts >= 1, "workers.max_attempts", ">= 1"),
            (self.row_group_mb >= 1, "row_group_mb", ">= 1"),
            (self.max_buffer_bytes >= 1 << 20, "max_buffer_bytes", ">= 1048576 (1 MiB)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"{name} = {get_dotted(self, name)!r} is invalid; expected {expected}")
        return self




# Beyond this many threads one model copy's forward scales poorly on CPUs: more copies do better.
CPU_THREADS_PER_ACTOR = 8


def sized_for(config: HarvestConfig, node_resources: list[dict[str, float]]) -> HarvestConfig:
    """``config`` with ``workers.actors`` and ``workers.cpus_per_actor`` left to their defaults sized
    to a cluster's nodes (each {"CPU": n, "GPU": m}): one actor per GPU with an equal share of its
    node's CPUs; without GPUs, one actor per CPU_THREADS_PER_ACTOR CPUs of each node (at least one
    per node), sharing the node's CPUs."""
    workers = config.workers
    gpus = [int(node.get("GPU", 0)) for node in node_resources] if config.model.device != "cpu" else []
    cpus = [max(1, int(node.get("CPU", 1))) for node in node_resources] or [1]
    if sum(gpus):
        per_node = [(g, c // g) for g, c in zip(gpus, cpus, strict=True) if g]
    else:
        per_node = [(max(1, c // CPU_THREADS_PER_ACTOR), c // max(1, c // CPU_THREADS_PER_ACTOR)) for c in cpus]
    actors = workers.actors if workers.actors is not None else sum(count for count, _ in per_node)
    share = workers.cpus_per_actor if workers.cpus_per_actor is not None else float(
        max(1, min(share for _, share in per_node)))
    return dataclasses.replace(config, workers=dataclasses.replace(workers, actors=actors, cpus_per_actor=share))


def harvest_config_from_file(url: str) -> HarvestConfig:
    return from_dict(HarvestConfig, stage_section(url, "harvest"), f"{url}: harvest")
