"""Lexica's first stage: harvest a model layer's activations over a corpus into an activation store.

``lexica.harvest(...)`` runs a harvest from Python. The store format itself (its one writer and
reader) is :mod:`lexica.store`; the run layout is :mod:`lexica.run`.
"""

from __future__ import annotations

from lexica.entry import make_callable


def harvest(config=None, /, **knobs):
    """Harvest activations, as ``lexica harvest`` does; returns the :class:`HarvestSummary`.

    ``config`` is a pipeline YAML path, a mapping of ``harvest:`` keys or a ``HarvestConfig``;
    ``knobs`` set keys over it (sections as mappings). ``model="PATH"`` and ``corpus=[FILES]`` are
    short for ``model={"path": ...}`` and ``corpus={"paths": [...]}``::

        lexica.harvest(model="assets/models/smollm2-135m-instruct", corpus=["sotu.jsonl"],
                       hook="resid_post.15", run="runs/mine")
    """
    from lexica.config import stage_config
    from lexica.harvest.config import HarvestConfig
    from lexica.harvest.pool import run_harvest

    if isinstance(knobs.get("model"), str):
        knobs["model"] = {"path": knobs["model"]}
    if isinstance(knobs.get("corpus"), (str, list, tuple)):
        paths = knobs["corpus"]
        knobs["corpus"] = {"paths": [paths] if isinstance(paths, str) else list(paths)}
    return run_harvest(stage_config(HarvestConfig, "harvest", config, knobs).validate())


make_callable(__name__, harvest)
