"""Lexica: map the concepts inside a language model.

Harvest a model's activations over a corpus, fit sparse dictionaries to them, and build, browse and
steer a feature atlas. The notebook-sized API is here (``lexica.Run``, ``lexica.harvest`` ...; see
docs/python-api.md); the ``lexica`` command runs the same stages from a shell.
"""

from __future__ import annotations

import os

# The stage folders sit at the repository root in a source checkout (the agreed layout) and inside
# this package in an installed wheel. Adding the root to __path__ makes ``lexica.harvest`` resolve
# in a bare checkout too, e.g. in a Ray job whose working directory is the uploaded repository.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "harvest")) and \
        os.path.isfile(os.path.join(_ROOT, "harvest", "__init__.py")) and _ROOT not in __path__:
    __path__.append(_ROOT)

# The public API, imported on first use so that ``import lexica`` (and ``lexica --help``) stays
# quick and torch is loaded only when something needs it.
_EXPORTS = {
    "Run": "lexica.api", "ActiveFeatures": "lexica.api", "active_features": "lexica.api",
    "analyse": "lexica.analysis", "Dictionary": "lexica.analysis.sources", "SparseCode": "lexica.train.architectures",
    "ActivationStore": "lexica.store", "ActivationBatch": "lexica.store", "write_store": "lexica.store",
    "LexicaError": "lexica.errors", "ConfigError": "lexica.errors",
}
# ``lexica.harvest(...)`` and ``lexica.train(...)`` are the stage packages themselves, callable.
__all__ = sorted([*_EXPORTS, "harvest", "train"])


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("harvest", "train", "analysis", "deploy"):
        return importlib.import_module(f"lexica.{name}")
    raise AttributeError(f"module 'lexica' has no attribute {name!r}")
