"""What an analysis reads: the dictionary (by name, under the run), the store it describes, and
the model (tokenizer, causal LM); with the checks that they belong together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lexica import storage
from lexica.config import ConfigError
from lexica.errors import LexicaError
from lexica.models import ModelConfig, ModelError, config_from_manifest, load_tokenizer
from lexica.run import Run, RunError
from lexica.store import ActivationStore, StoreError, StoreMismatchError
from lexica.train.architectures import SparseCode


class AnalysisError(LexicaError, ValueError):
    """Analysis input is missing or inconsistent (message names what and where)."""


@dataclass
class Dictionary:
    name: str
    url: str  # the exported folder (…/dictionaries/<name>/final)
    module: torch.nn.Module  # takes raw activations
    config: dict  # the export's cfg.json

    @property
    def metadata(self) -> dict:
        return self.config.get("metadata", {})

    @property
    def d_sae(self) -> int:
        return int(self.config["d_sae"])

    @property
    def d_in(self) -> int:
        return int(self.config["d_in"])

    @property
    def hook(self) -> str | None:
        """The hook point the dictionary reads (encodes)."""
        return self.metadata.get("hook")

    @property
    def target_hook(self) -> str | None:
        """A transcoder's: the hook point it writes (decodes into); None for an autoencoder."""
        return self.metadata.get("target_hook")

    @property
    def output_hook(self) -> str | None:
        """Where the decoder's directions live: the target of a transcoder, else the hook itself."""
        return self.target_hook or self.hook

    def encode(self, activations: torch.Tensor) -> SparseCode:
        """Raw activations [n, d_in] (the hook's own scale: normalisation is folded in) → the
        active features of each row: ``values`` and feature ``indices``, [n, k] each."""
        with torch.no_grad():
            return self.module.encode(activations.to(self.W_enc.dtype))

    def decode(self, code: SparseCode) -> torch.Tensor:
        with torch.no_grad():
            return self.module.decode(code)

    def reconstruct(self, activations: torch.Tensor) -> torch.Tensor:
        """The dictionary's output for raw activations of its hook: decode(encode(x)), plus a
        skip-transcoder's linear path; for a transcoder, activations of its target hook."""
        with torch.no_grad():
            return self.module.reconstruct(activations.to(self.W_enc.dtype))

    # The weights, SAELens' names and shapes: W_enc [d_in, d_sae], W_dec [d_sae, d_in].
    @property
    def W_enc(self) -> torch.Tensor:  # noqa: N802 - the field's own name
        return self.module.W_enc

    @property
    def b_enc(self) -> torch.Tensor:
        return self.module.b_enc

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        return self.module.W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        return self.module.b_dec


def resolve_dictionary_name(run_url: str, name: str | None, storage_options: dict | None = None) -> str:
    try:
        return Run(run_url, storage_options).dictionary_name(name)
    except RunError as error:
        raise AnalysisError(str(error)) from error


def open_dictionary(run_url: str, name: str | None, storage_options: dict | None = None) -> Dictionary:
    from lexica.train.export import load_dictionary

    name = resolve_dictionary_name(run_url, name, storage_options)
    url = Run(run_url, storage_options).export_url(name)
    fs, folder = storage.url_to_fs(url, storage_options)
    config = storage.read_json(fs, storage.join(folder, "cfg.json"))
    return Dictionary(name=name, url=url, module=load_dictionary(url, storage_options), config=config)


def open_store(dictionary: Dictionary, store: str | None, run_url: str,
               storage_options: dict | None = None) -> ActivationStore:
    """The store to analyse, refused unless it holds the dictionary's model, hook and width."""
    metadata = dictionary.metadata
    url = store or metadata.get("lexica_store") or Run(run_url, storage_options).store_url(metadata.get("hook", ""))
    expect = {"d_model": int(dictionary.config["d_in"])}
    if metadata.get("hook"):
        expect["hook"] = metadata["hook"]
    if (metadata.get("model") or {}).get("config_hash"):
        expect["model.config_hash"] = metadata["model"]["config_hash"]
    try:
        opened = ActivationStore(url, storage_options, expect=expect)
    except StoreMismatchError as error:
        raise AnalysisError(f"dictionary {dictionary.name} was not trained on this model and hook: {error}") from error
    if not any(commit.rows for commit in opened.commits()):
        raise StoreError(f"store {url} has no committed rows; harvest it first")
    return opened


def model_config(store: ActivationStore, override: str | None, device: str = "auto") -> ModelConfig:
    """The store's model (id and recorded revision), or ``override`` (a local copy of it)."""
    try:
        return config_from_manifest(store.manifest, device=device, path=override)
    except ModelError as error:
        raise ConfigError(f"store {store.url} records no model id; give analysis.model (--model)") from error


def token_strings(tokenizer, token_ids) -> list[str]:
    """Each id decoded on its own, as it shows inside a context (byte-level pieces included)."""
    cache: dict[int, str] = {}
    strings = []
    for token_id in token_ids:
        token_id = int(token_id)
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        strings.append(cache[token_id])
    return strings


@dataclass
class LoadedRun:
    """What steering and monitoring share: the dictionary, its store's facts, model and tokenizer."""
    dictionary: Dictionary
    hook: str
    model: ModelConfig  # id (or the given local copy) and the recorded revision
    manifest: dict
    tokenizer: object

    @property
    def model_path(self) -> str:
        return self.model.path


def open_run(run_url: str, dictionary_name: str | None, store: str | None, model: str | None,
             storage_options: dict | None = None) -> LoadedRun:
    dictionary = open_dictionary(run_url, dictionary_name, storage_options)
    opened = open_store(dictionary, store, run_url, storage_options)
    config = model_config(opened, model)
    return LoadedRun(dictionary=dictionary, hook=opened.manifest["hook"], model=config,
                     manifest=opened.manifest, tokenizer=load_tokenizer(config))


def check_width(model: torch.nn.Module, loaded: LoadedRun) -> None:
    d_in = int(loaded.dictionary.config["d_in"])
    if int(model.config.hidden_size) != d_in:
        raise AnalysisError(f"model {loaded.model_path} has hidden size {model.config.hidden_size} but dictionary "
                            f"{loaded.dictionary.name} takes {d_in}-wide activations")
