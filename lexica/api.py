"""The notebook-sized API: a run folder with its stores, dictionaries and atlases, loaded.

    run = lexica.Run("runs/demo")
    store = run.store()                       # the harvested activations (ActivationStore)
    sae = run.dictionary()                    # the newest exported dictionary
    code = sae.encode(store.context(3, 120).activation.float())
    active = run.active_features("The Congress shall have power to lay and collect taxes")
    active.strongest(5)                       # [(feature, max activation, tokens fired on), ...]

This module sits above every stage (it loads dictionaries and runs the model up to the hook);
the layout and records it inherits are :class:`lexica.run.Run`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa
import torch

from lexica import run as run_layout
from lexica.analysis import atlas
from lexica.analysis.sources import Dictionary, LoadedRun, open_dictionary, open_run
from lexica.train.architectures import SparseCode


@dataclass
class ActiveFeatures:
    """The features a dictionary finds on each token of a text."""

    text: str
    tokens: list[str]  # each token decoded on its own
    code: SparseCode  # [tokens, k]: values (0 = inactive) and feature ids per token
    dictionary: str

    def at(self, position: int) -> list[tuple[int, float]]:
        """(feature, activation) of the features active on token ``position``, strongest first."""
        values, indices = self.code.values[position], self.code.indices[position]
        active = [(int(feature), float(value)) for value, feature in zip(values, indices, strict=True) if value > 0]
        return sorted(active, key=lambda pair: -pair[1])

    def strongest(self, n: int = 10) -> list[tuple[int, float, int]]:
        """The ``n`` features with the largest activation anywhere in the text: (feature, max
        activation, tokens it fired on)."""
        active = self.code.values > 0
        features = self.code.indices[active]
        if not len(features):
            return []
        values = self.code.values[active]
        ids, inverse = torch.unique(features, return_inverse=True)
        maxima = torch.zeros(len(ids)).scatter_reduce(0, inverse, values.float(), "amax")
        counts = torch.bincount(inverse, minlength=len(ids))
        order = torch.argsort(maxima, descending=True)[:n]
        return [(int(ids[i]), float(maxima[i]), int(counts[i])) for i in order]

    def __repr__(self) -> str:
        shown = ", ".join(f"{feature} ({value:.3g})" for feature, value, _ in self.strongest(5))
        return f"ActiveFeatures({len(self.tokens)} tokens of {self.dictionary}; strongest: {shown or 'none'})"


class Run(run_layout.Run):
    """A run folder (any fsspec URL), with its dictionaries and atlases loaded on request."""

    def __init__(self, url: str, storage_options: dict | None = None):
        super().__init__(url, storage_options)
        self._loaded: dict[tuple, tuple[LoadedRun, torch.nn.Module]] = {}  # per (dictionary, device)

    def dictionary(self, name: str | None = None) -> Dictionary:
        """An exported dictionary (default: the newest): ``encode``, ``decode`` and its weights."""
        return open_dictionary(self.url, name, self.storage_options)

    def atlas(self, table: str = "features", dictionary: str | None = None) -> pa.Table:
        """One table of a dictionary's atlas (features, contexts, logits, neighbours, map)."""
        name = self.dictionary_name(dictionary)
        return atlas.read_table(self.atlas_url(name), table, self.storage_options)

    def active_features(self, text: str, dictionary: str | None = None, device: str = "cpu") -> ActiveFeatures:
        """The dictionary's features on every token of ``text``: the model runs up to the hook,
        on the store's context windows and BOS policy. The model is loaded once per Run."""
        from lexica.analysis.monitor import load_base_model, text_codes
        from lexica.analysis.steering import context_limit

        key = (self.dictionary_name(dictionary), device)
        if key not in self._loaded:
            loaded = open_run(self.url, key[0], None, None, self.storage_options)
            model = load_base_model(dataclasses.replace(loaded.model, device=device), loaded.hook)
            self._loaded[key] = (loaded, model)
        loaded, model = self._loaded[key]
        context_length = int(loaded.manifest.get("context_length") or context_limit(model))
        bos = bool((loaded.manifest.get("bos") or {}).get("prepend"))
        tokens, code = text_codes(model, loaded.tokenizer, loaded.dictionary.module.to(device), loaded.hook, text,
                                  context_length, bos)
        return ActiveFeatures(text=text, tokens=tokens, code=code, dictionary=loaded.dictionary.name)


def active_features(run: str, text: str, dictionary: str | None = None, device: str = "cpu") -> ActiveFeatures:
    """``Run(run).active_features(text, dictionary, device)``: one call from a run URL to the
    features active on each token of a text."""
    return Run(run).active_features(text, dictionary, device)
