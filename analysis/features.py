"""``lexica analysis features``: the whole atlas of one dictionary, stage by stage.

Statistics pass → examples → contexts → logit effects → neighbours → map → site, each written to
``<run>/analysis/<dictionary>/`` as soon as it is done (so a failure late in the run keeps the
tables already computed), with the timings in ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from lexica.analysis import atlas, geometry
from lexica.analysis.config import AnalysisConfig
from lexica.analysis.sources import model_config, open_dictionary, open_store
from lexica.models import load_tokenizer
from lexica.run import Run

log = logging.getLogger(__name__)


def build_atlas(config: AnalysisConfig) -> dict:
    from lexica.analysis.contexts import contexts_in_passes
    from lexica.analysis.logits import load_readout, logit_effects
    from lexica.analysis.stats import compute_statistics
    from lexica.models import resolve_device

    config.validate()
    config = config.sized()
    timings: dict[str, float] = {}
    dictionary = open_dictionary(config.run, config.dictionary, config.storage_options)
    store = open_store(dictionary, config.store, config.run, config.storage_options)
    run = Run(config.run, config.storage_options)
    folder = run.atlas_url(dictionary.name)
    run.record("analysis", {**dataclasses.asdict(config), "dictionary": dictionary.name})
    # The driver may run on a CPU-only head node while its Ray tasks get GPUs ("cuda" there): its
    # own work (logit effects, neighbours) then runs on the CPU.
    local = "cpu" if config.device.startswith("cuda") and not torch.cuda.is_available() else config.device
    device = resolve_device(local)
    module = dictionary.module.to(device)
    model = model_config(store, config.model, device=local)
    tokenizer = load_tokenizer(model)

    def timed(name: str, work):
        started = time.perf_counter()
        result = work()
        timings[name] = round(time.perf_counter() - started, 2)
        log.info("%s done in %.1f s", name, timings[name])
        return result

    statistics = timed("statistics", lambda: compute_statistics(store, module, config))
    features = statistics.features_table()
    atlas.write_table(folder, "features", features, config.storage_options)
    examples = statistics.examples_table(config.bands, config.per_band)
    # Contexts go to storage a group of features at a time: at 2^20 features they would not fit in memory.
    timed("contexts", lambda: atlas.write_table_in_parts(
        folder, "contexts", contexts_in_passes(store, module, examples, tokenizer, config), config.storage_options))
    examples = None
    if config.label_field:
        from lexica.analysis.labels import document_labels, label_profiles

        labels = document_labels(store.manifest["corpus"], config.label_field, config.storage_options)
        contexts = atlas.read_table(folder, "contexts", config.storage_options).select(["feature", "doc_id"])
        atlas.write_table(folder, "labels", label_profiles(contexts, labels), config.storage_options)
        contexts = labels = None

    readout = timed("load model head", lambda: load_readout(model))
    logits = timed("logit effects", lambda: logit_effects(module.W_dec, readout, tokenizer, config.logit_tokens))
    atlas.write_table(folder, "logits", logits, config.storage_options)
    readout = None  # the unembedding is the largest tensor here; free it before the map

    exact, recall, quality = None, None, None
    if config.neighbours or config.map:
        # On the analysis device: a GPU searches exactly at any width.
        directions = geometry.unit_directions(module.W_dec.detach())
        wanted = (max(config.neighbours, config.map_neighbours - 1) if config.map and config.map_method == "umap"
                  else config.neighbours)
        neighbours, cosines, exact, recall = timed("neighbours", lambda: geometry.find_neighbours(
            directions, wanted, config.exact_neighbours_up_to, config.neighbour_recall, config.neighbour_budget_s))
        recall = round(recall, 4)
        atlas.write_table(folder, "neighbours", geometry.neighbour_table(neighbours, cosines, config.neighbours),
                          config.storage_options)
    if config.map:
        directions = directions.cpu()
        layout = timed("map", lambda: geometry.map_table(
            directions, config.clusters, known=(neighbours, cosines), neighbours=config.map_neighbours,
            min_dist=config.map_min_dist, sample=config.map_sample, method=config.map_method,
            perplexity=config.map_perplexity))
        atlas.write_table(folder, "map", layout, config.storage_options)
        quality = timed("map quality", lambda: geometry.map_quality(
            directions, np.stack([layout["x"].to_numpy(), layout["y"].to_numpy()], axis=1),
            layout["cluster"].to_numpy()))
        log.info("map: %s", quality)

    summary = {
        "dictionary": dictionary.name, "dictionary_url": dictionary.url, "architecture":
            dictionary.metadata.get("lexica_architecture", dictionary.config.get("architecture")),
        "d_sae": dictionary.d_sae, "d_in": int(dictionary.config["d_in"]), "store": store.url, "hook": store.hook,
        # A transcoder's features read the hook and write the target: contexts come from the
        # hook's store, logit effects and neighbours from its decoder (the target's space).
        "target_hook": dictionary.target_hook,
        "model": model.path, "tokens": int(statistics.tokens), "histogram_edges": atlas.HISTOGRAM_EDGES.tolist(),
        "neighbours_exact": exact, "neighbours_recall": recall, "map_quality": quality,
        "dead_features": int((features.column("fires").to_numpy() == 0).sum()),
        "config": {**dataclasses.asdict(config), "storage_options": None}, "timings": timings,
        "created_at": time.time(),
    }
    atlas.write_summary(folder, summary, config.storage_options)
    if config.site:
        from lexica.analysis.site import build_site

        summary["site"] = timed("site", lambda: build_site(folder, config.storage_options))
        summary["timings"] = timings
        atlas.write_summary(folder, summary, config.storage_options)
    summary["folder"] = folder
    return summary
