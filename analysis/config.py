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
    label_field: str | None = knob(None, "a field of the corpus rows labelling documents (e.g. lang): each feature's "
                                         "shown examples are counted by label (labels.parquet, feature pages)")
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
class BackendOptions:
    """How an explainer or scorer model is reached: a local chat model (in this process, or on Ray
    actors) or an OpenAI-compatible endpoint (an http(s) URL)."""

    device: str = knob("auto", "local model: auto (CUDA when present), cpu or cuda")
    workers: int = knob(0, "local model: Ray actors each holding a copy (a GPU each when the cluster has GPUs); 0 "
                           "runs it in this process")
    batch_size: int = knob(8, "prompts a local model answers at a time")
    endpoint_model: str | None = knob(None, "endpoint: the model name to ask for (default: the endpoint's only "
                                            "model, from /v1/models)")
    api_key_env: str = knob("OPENAI_API_KEY", "endpoint: the environment variable holding its API key (the key "
                                              "itself is never written or logged)")
    concurrency: int = knob(8, "endpoint: requests in flight at once")
    retries: int = knob(4, "endpoint: retries of a failed request (timeouts, 429, 5xx), with exponential back-off")
    request_timeout_s: float = knob(120.0, "endpoint: seconds one request may take")

    def backend_checks(self) -> list[tuple[bool, str, str]]:
        return [(self.workers >= 0, "workers", ">= 0"), (self.batch_size >= 1, "batch_size", ">= 1"),
                (self.concurrency >= 1, "concurrency", ">= 1"), (self.retries >= 0, "retries", ">= 0"),
                (self.request_timeout_s > 0, "request_timeout_s", "> 0"),
                (bool(self.api_key_env), "api_key_env", "an environment variable's name")]


@dataclass
class ExplainConfig(BackendOptions):
    """``lexica explain`` (the ``explain:`` section of a pipeline config, or flags)."""

    run: str | None = knob(None, "run folder URL (required: flag, config or the config's top-level run)")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the newest export)")
    features: str = knob("top:100", "which features: all, a range 0-99, a list 1,5,9 (ranges allowed), or top:N by "
                                    "density")
    explainer: str | None = knob(None, "the explainer: a local chat model's folder or hub id, or an "
                                       "OpenAI-compatible endpoint's URL (http://host:port/v1)")
    max_examples: int = knob(12, "activating examples shown to the explainer per feature (top examples first, then "
                                 "quantile samples, even ranks only); odd ranks are held out for scoring")
    features_per_part: int = knob(8, "features explained per committed part (a crash loses at most these)")
    max_new_tokens: int = knob(40, "longest explanation, in tokens")
    site: bool = knob(True, "rebuild the atlas's site afterwards, so its pages and search show the explanations")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")

    def validate(self) -> ExplainConfig:
        check_common(self, "explain", [
            (bool(self.explainer), "explainer", "a chat model's folder or hub id, or an endpoint URL"),
            (self.max_examples >= 1, "max_examples", ">= 1"),
            (self.features_per_part >= 1, "features_per_part", ">= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"), *self.backend_checks()])
        return self


@dataclass
class ScoreConfig(BackendOptions):
    """``lexica score`` (the ``score:`` section of a pipeline config, or flags)."""

    run: str | None = knob(None, "run folder URL (required: flag, config or the config's top-level run)")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the newest export)")
    store: str | None = knob(None, "activation store URL (default: the atlas's store), where negatives are checked")
    model: str | None = knob(None, "model folder or hub id for its tokenizer (default: the atlas's model)")
    features: str = knob("all", "which explained features: all, a range 0-99, a list 1,5,9, or top:N by density")
    scorer: str | None = knob(None, "the scorer: a local chat model's folder or hub id, or an OpenAI-compatible "
                                    "endpoint's URL")
    positives: int = knob(10, "held-out activating examples per feature (odd ranks: never shown to the explainer)")
    negatives: int = knob(10, "non-activating examples per feature, checked against the store")
    hard_negatives: int = knob(5, "of the negatives, how many come from the feature's nearest neighbours' examples")
    hard_from: int = knob(5, "nearest decoder neighbours whose examples are hard-negative candidates")
    features_per_part: int = knob(8, "features scored per committed part")
    group_features: int = knob(256, "features whose negatives are checked against the store in one pass")
    seed: int = knob(0, "seed of the random negatives, wrong marks and baseline explanations")
    site: bool = knob(True, "rebuild the atlas's site afterwards, so its pages show the scores")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")

    def validate(self) -> ScoreConfig:
        check_common(self, "score", [
            (bool(self.scorer), "scorer", "a chat model's folder or hub id, or an endpoint URL"),
            (self.positives >= 1, "positives", ">= 1"), (self.negatives >= 1, "negatives", ">= 1"),
            (0 <= self.hard_negatives <= self.negatives, "hard_negatives", "between 0 and negatives"),
            (self.hard_from >= 0, "hard_from", ">= 0"), (self.features_per_part >= 1, "features_per_part", ">= 1"),
            (self.group_features >= 1, "group_features", ">= 1"), *self.backend_checks()])
        return self


NEUTRAL_PROMPTS = ["I think that", "The next thing we did was", "Here is a short story:",
                   "My favourite part of the day is", "In the news today,", "Let me tell you about"]


@dataclass
class SteerEvalConfig(BackendOptions):
    """``lexica steer --evaluate`` (the ``steer_evaluation:`` section of a pipeline config, or flags);
    the backend options are the judge's."""

    run: str | None = knob(None, "run folder URL (required: flag, config or the config's top-level run)")
    dictionary: str | None = knob(None, "dictionary name under <run>/dictionaries/ (default: the newest export)")
    store: str | None = knob(None, "activation store URL (default: the one the dictionary was trained on)")
    model: str | None = knob(None, "model folder or hub id (default: the store's model)")
    features: str = knob("top:20", "which features: all, a range 0-99, a list 1,5,9, or top:N by density")
    strengths: str = knob("4x", "steering strengths, multiples of each feature's max activation (comma list: 2x,4x)")
    prompts: list = knob(NEUTRAL_PROMPTS, "neutral prompts the model continues")
    max_new_tokens: int = knob(24, "tokens generated per continuation (greedy)")
    judge: str | None = knob(None, "the judge of continuations against explanations: a local chat model's folder or "
                                   "an endpoint URL (default: no judgement)")
    seed: int = knob(0, "generation seed")
    storage_options: dict = knob({}, "fsspec options for the run URL; never credentials")

    def validate(self) -> SteerEvalConfig:
        check_common(self, "steer_evaluation", [
            (bool(self.strengths.strip()), "strengths", "multiples like 2x,4x"),
            (bool(self.prompts) and all(isinstance(p, str) and p.strip() for p in self.prompts), "prompts",
             "a list of non-empty prompts"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"), *self.backend_checks()])
        return self
