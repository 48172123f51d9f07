"""Typed configuration of the analysis stage (the ``analysis:`` section of a pipeline config, or flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lexica.cluster import gpu_count
from lexica.config import ConfigError, knob


@dataclass
class AnalysisConfig:
    run: str = knob("./runs/demo", "run folder URL; results go to <run>/analysis/<dictionary>/")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the only one, else "
                                        "the newest export)")
    store: str | None = knob(None, "activation store URL (default: the store the dictionary was trained on)")
    model: str | None = knob(None, "model folder or hub id for contexts, logit effects and steering (default: the "
                                   "store's model)")
    device: str = knob("auto", "auto (CUDA when present), cpu or cuda")
    max_tokens: int | None = knob(None, "statistics over only the first N store tokens (default: all)")
    batch_rows: int = knob(4096, "tokens encoded per batch in the statistics pass")
    workers: int | None = knob(None, "parallel Ray tasks of the statistics and context passes: default one per GPU of "
                                     "the cluster, else one per cpus_per_worker of its CPUs; 0 runs in this process")
    cpus_per_worker: float = knob(1.0, "CPUs reserved per task (torch threads follow)")
    top_examples: int = knob(20, "top-activating examples kept per feature")
    samples: int = knob(64, "uniformly sampled firing examples kept per feature (for the quantile bands)")
    bands: int = knob(4, "activation quantile bands the samples are shown in")
    per_band: int = knob(4, "examples shown per quantile band")
    window_before: int = knob(16, "context tokens before the activating token")
    window_after: int = knob(8, "context tokens after the activating token")
    logit_tokens: int = knob(10, "promoted and suppressed output tokens kept per feature")
    neighbours: int = knob(10, "nearest features by decoder cosine kept per feature (0: no neighbour search; the "
                               "map needs it)")
    exact_neighbours_up_to: int = knob(32768, "exact neighbour search up to this many features (at any width on a "
                                              "GPU); beyond, FAISS inverted-file search")
    neighbour_recall: float = knob(0.95, "recall the approximate search probes more cells to reach (measured on a "
                                         "sample against exact search)")
    neighbour_budget_s: float = knob(400.0, "seconds the approximate search may take (with the map, ~15 min at 2^20 "
                                            "here); it stops probing more cells "
                                            "before the whole search would overrun this")
    map: bool = knob(True, "compute the 2-D map and clusters")
    map_method: str = knob("tsne", "tsne (openTSNE, cosine; keeps more decoder neighbours together) or umap")
    map_perplexity: float = knob(30.0, "t-SNE's perplexity")
    map_neighbours: int = knob(15, "UMAP's n_neighbors (the neighbour search finds this many for it)")
    map_min_dist: float = knob(0.1, "UMAP's min_dist")
    map_sample: int = knob(32768, "the layout is made for at most this many features; the others are placed among "
                                  "their nearest sampled features")
    clusters: int | None = knob(None, "k-means clusters of decoder directions (default sqrt(features / 2))")
    site: bool = knob(True, "build the static HTML feature browser under site/")
    ray_address: str | None = knob(None, "Ray cluster address; default RAY_ADDRESS, else an embedded local Ray")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")

    def sized_for(self, resources: dict[str, float]) -> AnalysisConfig:
        """This config with ``workers`` left to its default sized to ``resources`` (CPU and GPU counts)."""
        if self.workers is not None:
            return self
        gpus = gpu_count(resources, self.device)
        workers = gpus if gpus else max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))
        return dataclasses.replace(self, workers=workers)

    def sized(self) -> AnalysisConfig:
        """This config with ``workers`` resolved on the Ray cluster (started if need be) when unset."""
        if self.workers is not None:
            return self
        from lexica.cluster import cluster_resources

        return self.sized_for(cluster_resources(self.ray_address))

    def validate(self) -> AnalysisConfig:
        checks = [
            (self.batch_rows >= 1, "batch_rows", ">= 1"),
            (self.workers is None or self.workers >= 0, "workers", ">= 0 or null"),
            (self.cpus_per_worker > 0, "cpus_per_worker", "> 0"),
            (self.top_examples >= 1, "top_examples", ">= 1"),
            (self.samples >= 0, "samples", ">= 0"),
            (self.bands >= 1, "bands", ">= 1"),
            (self.per_band >= 0, "per_band", ">= 0"),
            (self.window_before >= 0, "window_before", ">= 0"),
            (self.window_after >= 0, "window_after", ">= 0"),
            (self.logit_tokens >= 1, "logit_tokens", ">= 1"),
            (self.neighbours >= 1 or (self.neighbours == 0 and not self.map), "neighbours",
             ">= 1 (0 skips the neighbour search, with map: false)"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1 or null"),
            (self.clusters is None or self.clusters >= 1, "clusters", ">= 1 or null"),
            (0 < self.neighbour_recall <= 1, "neighbour_recall", "in (0, 1]"),
            (self.neighbour_budget_s > 0, "neighbour_budget_s", "> 0"),
            (self.map_method in ("tsne", "umap"), "map_method", "tsne or umap"),
            (self.map_perplexity > 0, "map_perplexity", "> 0"),
            (self.map_neighbours >= 2, "map_neighbours", ">= 2"),
            (self.map_min_dist >= 0, "map_min_dist", ">= 0"),
            (self.map_sample >= 16, "map_sample", ">= 16"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"analysis.{name} = {getattr(self, name)!r} is invalid; expected {expected}")
        return self


@dataclass
class DictionaryTarget:
    """The knobs that name what steering and monitoring load: a run's dictionary, its store and model."""

    run: str | None = knob(None, "run folder URL (required: flag, config or the config's top-level run)")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the newest export)")
    store: str | None = knob(None, "activation store URL (default: the one the dictionary was trained on)")
    model: str | None = knob(None, "model folder or hub id (default: the store's model)")
    device: str = knob("auto", "auto (CUDA when present), cpu or cuda")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")


@dataclass
class SteerConfig(DictionaryTarget):
    """``lexica steer`` (the ``steer:`` section of a pipeline config, or flags)."""

    max_new_tokens: int = knob(40, "tokens to generate")
    seed: int = knob(0, "random seed of sampling (the same for both texts)")
    temperature: float = knob(0.0, "0 is greedy; above 0 samples")

    def validate(self) -> SteerConfig:
        check_common(self, "steer", [(self.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
                                     (self.temperature >= 0, "temperature", ">= 0")])
        return self


@dataclass
class MonitorConfig(DictionaryTarget):
    """``lexica monitor`` (the ``monitor:`` section of a pipeline config, or flags)."""

    text_field: str = knob("text", "field holding the text in .jsonl input")
    threshold: float = knob(0.0, "a feature fires above this activation")
    top: int = knob(5, "strongest positions shown per feature in the table")
    batch_tokens: int = knob(4096, "padded tokens per forward pass")

    def validate(self) -> MonitorConfig:
        check_common(self, "monitor", [(self.threshold >= 0, "threshold", ">= 0"), (self.top >= 1, "top", ">= 1"),
                                       (self.batch_tokens >= 1, "batch_tokens", ">= 1")])
        return self


def check_common(config, stage: str, checks: list[tuple[bool, str, str]]) -> None:
    if not config.run:
        raise ConfigError(f"{stage} needs a run folder: --run URL (or run: in the config)")
    for ok, name, expected in checks:
        if not ok:
            raise ConfigError(f"{stage}.{name} = {getattr(config, name)!r} is invalid; expected {expected}")


@dataclass
class ExplainConfig:
    """``lexica explain`` (the ``explain:`` section of a pipeline config, or flags)."""

    run: str | None = knob(None, "run folder URL (required: flag, config or the config's top-level run)")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the newest export)")
    features: str = knob("top:100", "which features: all, a range 0-99, a list 1,5,9 (ranges allowed), or top:N by "
                                    "density")
    explainer: str | None = knob(None, "the explainer: a local chat model's folder or hub id")
    device: str = knob("auto", "auto (CUDA when present), cpu or cuda")
    max_examples: int = knob(12, "activating examples shown to the explainer per feature (top examples first, then "
                                 "quantile samples); the others are held out for scoring")
    batch_size: int = knob(8, "prompts the explainer answers at a time")
    max_new_tokens: int = knob(40, "longest explanation, in tokens")
    site: bool = knob(True, "rebuild the atlas's site afterwards, so its pages and search show the explanations")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")

    def validate(self) -> ExplainConfig:
        check_common(self, "explain", [
            (bool(self.explainer), "explainer", "a chat model's folder or hub id"),
            (self.max_examples >= 1, "max_examples", ">= 1"), (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1")])
        return self
