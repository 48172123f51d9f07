"""Lexica's first stage: harvest a model layer's activations over a corpus into a Parquet store."""

from harvest.store import (
    ActivationBatch,
    ActivationStore,
    StoreError,
    StoreMismatchError,
    store_url,
)

__all__ = ["ActivationBatch", "ActivationStore", "StoreError", "StoreMismatchError", "store_url"]
