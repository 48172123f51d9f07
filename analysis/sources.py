"""What an analysis reads: the dictionary (by name, under the run), the store it describes, and
the model (tokenizer, causal LM); with the checks that they belong together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harvest import storage
from harvest.config import ConfigError
from harvest.store import ActivationStore, StoreError, StoreMismatchError, store_url


class AnalysisError(ValueError):
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


def dictionary_names(run_url: str, storage_options: dict | None = None) -> list[str]:
    """Dictionaries with a finished export under the run, newest export last."""
    fs, run = storage.url_to_fs(run_url, storage_options)
    folder = storage.join(run, "dictionaries")
    found = []
    for name in storage.list_names(fs, folder) if storage.exists(fs, folder) else []:
        config_path = storage.join(folder, name, "final", "cfg.json")
        if storage.exists(fs, config_path):
            found.append((fs.modified(config_path).timestamp() if storage.is_local(fs) else 0.0, name))
    return [name for _, name in sorted(found)]


def resolve_dictionary_name(run_url: str, name: str | None, storage_options: dict | None = None) -> str:
    names = dictionary_names(run_url, storage_options)
    if name:
        if name not in names:
            raise AnalysisError(f"dictionary {name!r} has no export under {run_url}/dictionaries "
                                f"(expected {name}/final/cfg.json); exported: {names or 'none'}")
        return name
    if not names:
        raise AnalysisError(f"{run_url} has no exported dictionary; train one first (python -m train)")
    return names[-1]


def open_dictionary(run_url: str, name: str | None, storage_options: dict | None = None) -> Dictionary:
    from train.export import load_dictionary

    name = resolve_dictionary_name(run_url, name, storage_options)
    url = storage.join(run_url.rstrip("/"), "dictionaries", name, "final")
    fs, folder = storage.url_to_fs(url, storage_options)
    config = storage.read_json(fs, storage.join(folder, "cfg.json"))
    return Dictionary(name=name, url=url, module=load_dictionary(url, storage_options), config=config)


def open_store(dictionary: Dictionary, store: str | None, run_url: str,
               storage_options: dict | None = None) -> ActivationStore:
    """The store to analyse, refused unless it holds the dictionary's model, hook and width."""
    metadata = dictionary.metadata
    url = store or metadata.get("lexica_store") or store_url(run_url, metadata.get("hook", ""))
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


def model_path(store: ActivationStore, override: str | None) -> str:
    path = override or (store.manifest.get("model") or {}).get("id")
    if not path:
        raise ConfigError(f"store {store.url} records no model id; give analysis.model")
    return path


def load_tokenizer(path: str):
    from harvest.config import ModelConfig
    from harvest.model import load_config_and_tokenizer

    return load_config_and_tokenizer(ModelConfig(path=path))[1]


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


def load_causal_lm(path: str, device: str, revision: str | None = None):
    """The whole causal LM in float32 (steering needs the LM head), eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    from harvest.model import ModelError, resolve_device

    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load causal LM {path!r}: {error}") from error
    return model.to(resolve_device(device)).eval().requires_grad_(False)


@dataclass
class LoadedRun:
    """What steering and monitoring share: the dictionary, its store's facts, model and tokenizer."""
    dictionary: Dictionary
    hook: str
    model_path: str
    manifest: dict
    tokenizer: object


def open_run(run_url: str, dictionary_name: str | None, store: str | None, model: str | None,
             storage_options: dict | None = None) -> LoadedRun:
    dictionary = open_dictionary(run_url, dictionary_name, storage_options)
    opened = open_store(dictionary, store, run_url, storage_options)
    path = model_path(opened, model)
    return LoadedRun(dictionary=dictionary, hook=opened.manifest["hook"], model_path=path,
                     manifest=opened.manifest, tokenizer=load_tokenizer(path))


def check_width(model: torch.nn.Module, loaded: LoadedRun) -> None:
    d_in = int(loaded.dictionary.config["d_in"])
    if int(model.config.hidden_size) != d_in:
        raise AnalysisError(f"model {loaded.model_path} has hidden size {model.config.hidden_size} but dictionary "
                            f"{loaded.dictionary.name} takes {d_in}-wide activations")
