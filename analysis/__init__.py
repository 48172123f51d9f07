"""Lexica's third stage: a dictionary's feature atlas and browser, steering and monitoring.

``lexica.analyse(...)`` builds an atlas from Python.
"""

from __future__ import annotations


def analyse(config=None, /, **knobs) -> dict:
    """Build a dictionary's feature atlas, as ``lexica analysis features`` does; returns its summary.

    ``config`` is a pipeline YAML path, a mapping of ``analysis:`` keys or an ``AnalysisConfig``;
    ``knobs`` set keys over it, e.g. ``lexica.analyse(run="runs/demo", workers=0)``.
    """
    from lexica.analysis.config import AnalysisConfig
    from lexica.analysis.features import build_atlas
    from lexica.config import stage_config

    return build_atlas(stage_config(AnalysisConfig, "analysis", config, knobs).validate())
