"""Lexica's second stage: fit sparse dictionaries to an activation store (a Ray Train job).

``lexica.train(...)`` trains from Python.
"""

from __future__ import annotations

from lexica.entry import make_callable


def train(config=None, /, **knobs) -> dict:
    """Train a dictionary, as ``lexica train`` does; returns the summary (name, folder, final
    metrics, evaluation, the trained module).

    ``config`` is a pipeline YAML path, a mapping of ``train:`` keys or a ``TrainConfig``; ``knobs``
    set keys over it, e.g. ``lexica.train(run="runs/demo", architecture="topk", width="8x", k=32)``.
    Without ``run`` the dictionary goes into the run that holds ``store``.
    """
    from lexica.config import stage_config
    from lexica.train.config import TrainConfig, resolve_sources
    from lexica.train.fit import fit

    return fit(resolve_sources(stage_config(TrainConfig, "train", config, knobs)))


make_callable(__name__, train)
