"""A run folder and everything in it, by name: the one owner of the run layout.

    <run>/run.yaml                         each stage's resolved configuration (its record)
    <run>/activations/<hook>/              an activation store (docs/store-format.md)
    <run>/dictionaries/<name>/final/       an exported dictionary (SAELens layout)
    <run>/dictionaries/<name>/checkpoints/ Ray Train checkpoints of its training
    <run>/analysis/<dictionary>/           the dictionary's feature atlas (tables and site/)
    <run>/sweeps/<sweep>/checkpoints/      Ray Train checkpoints of a sweep (many dictionaries, one job)

Every stage finds these places through :class:`Run`, never by joining path literals, so the layout
is written down once. A run is any fsspec URL (a local folder, ``s3://...``).
"""

from __future__ import annotations

from datetime import datetime, timezone

import yaml

from lexica import storage
from lexica.errors import LexicaError
from lexica.models import ModelConfig, config_from_manifest
from lexica.store import ActivationStore

RECORD_FILE = "run.yaml"
ACTIVATIONS = "activations"
DICTIONARIES = "dictionaries"
ANALYSIS = "analysis"
SWEEPS = "sweeps"
EXPORT = "final"  # the exported dictionary inside its folder
EXPORT_CONFIG = "cfg.json"
EXPORTED_AT_KEY = "lexica_exported_at"  # cfg.json metadata: when the export was written (UTC, ISO 8601)


class RunError(LexicaError, ValueError):
    """Something a run should hold is missing (a store, a dictionary, a record)."""


def store_url(run_url: str, hook_name: str) -> str:
    return storage.join(run_url.rstrip("/"), ACTIVATIONS, hook_name)


def run_holding(store: str) -> str | None:
    """``<run>`` of a store at ``<run>/activations/<hook>``; None for a store outside a run layout."""
    parts = store.rstrip("/").rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[1] == ACTIVATIONS and parts[0] else None


def export_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Run:
    """One run folder: where its stores, dictionaries and atlases are, and what its stages recorded."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = storage.absolute_url(str(url)).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.url_to_fs(self.url, self.storage_options)

    def __repr__(self) -> str:
        return f"Run({self.url!r})"

    # ------------------------------------------------------------ layout

    def store_url(self, hook: str) -> str:
        return store_url(self.url, hook)

    def dictionary_url(self, name: str) -> str:
        """The dictionary's folder (metrics, checkpoints, plot); its export is :meth:`export_url`."""
        return storage.join(self.url, DICTIONARIES, name)

    def sweep_url(self, name: str) -> str:
        """A sweep's folder: the checkpoints of the one job that trains its dictionaries."""
        return storage.join(self.url, SWEEPS, name)

    def export_url(self, name: str) -> str:
        return storage.join(self.dictionary_url(name), EXPORT)

    def atlas_url(self, dictionary_name: str) -> str:
        return storage.join(self.url, ANALYSIS, dictionary_name)

    # ------------------------------------------------------------ records (run.yaml)

    def records(self) -> dict:
        """run.yaml: each stage's resolved configuration, by stage name ({} when nothing ran yet)."""
        path = storage.join(self.root, RECORD_FILE)
        if not storage.exists(self.fs, path):
            return {}
        with self.fs.open(path, "rb") as handle:
            try:
                document = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise RunError(f"{self.url}/{RECORD_FILE} is not valid YAML: {error}") from error
        if not isinstance(document, dict):
            raise RunError(f"{self.url}/{RECORD_FILE}: top level must be a mapping")
        return document

    def record(self, stage: str, section: dict) -> None:
        """Replace one stage's section of run.yaml with the configuration it ran with."""
        document = self.records()
        section = dict(section)
        section.pop("storage_options", None)  # may name endpoints; never credentials, but keep runs portable
        document[stage] = section
        storage.write_bytes(self.fs, storage.join(self.root, RECORD_FILE),
                            yaml.safe_dump(document, sort_keys=False).encode())

    # ------------------------------------------------------------ stores

    def hooks(self) -> list[str]:
        """Hook points with a store in this run, sorted."""
        folder = storage.join(self.root, ACTIVATIONS)
        if not storage.exists(self.fs, folder):
            return []
        return sorted(name for name in storage.list_names(self.fs, folder)
                      if storage.exists(self.fs, storage.join(folder, name, "manifest.json")))

    def harvested_hook(self) -> str:
        """The hook of the run's harvest: run.yaml's record (with 'middle' resolved; an error when the
        harvest wrote several stores), else the only store."""
        hook = (self.records().get("harvest") or {}).get("hook")
        if hook and "," in hook:
            raise RunError(f"{self.url}'s harvest wrote {hook.count(',') + 1} stores ({hook}); "
                           "name one hook (--hook) or store (--store)")
        if hook:
            return hook
        hooks = self.hooks()
        if len(hooks) == 1:
            return hooks[0]
        raise RunError(f"{self.url} records no harvest hook and holds {len(hooks)} stores "
                       f"({', '.join(hooks) or 'none'}); name the hook (--hook) or the store (--store)")

    def store(self, hook: str | None = None, expect: dict | None = None) -> ActivationStore:
        """The activation store of ``hook`` (default: the harvested one)."""
        return ActivationStore(self.store_url(hook or self.harvested_hook()), self.storage_options, expect=expect)

    # ------------------------------------------------------------ dictionaries

    def dictionary_names(self) -> list[str]:
        """Dictionaries with a finished export, oldest first: ordered by the export time their
        cfg.json records (the same on every filesystem), then by name."""
        folder = storage.join(self.root, DICTIONARIES)
        found = []
        for name in storage.list_names(self.fs, folder) if storage.exists(self.fs, folder) else []:
            config_path = storage.join(folder, name, EXPORT, EXPORT_CONFIG)
            if storage.exists(self.fs, config_path):
                try:
                    exported_at = str(storage.read_json(self.fs, config_path).get("metadata", {})
                                      .get(EXPORTED_AT_KEY, ""))
                except (storage.StorageError, ValueError, AttributeError):
                    exported_at = ""  # unreadable: sorts first; opening it names the problem
                found.append((exported_at, name))
        return [name for _, name in sorted(found)]

    def dictionary_name(self, name: str | None = None) -> str:
        """``name`` if it has an export here, else (``None``) the newest export."""
        names = self.dictionary_names()
        if name:
            if name not in names:
                raise RunError(f"dictionary {name!r} has no export under {self.url}/{DICTIONARIES} "
                               f"(expected {name}/{EXPORT}/{EXPORT_CONFIG}); exported: {names or 'none'}")
            return name
        if not names:
            raise RunError(f"{self.url} has no exported dictionary; train one first (lexica train --run {self.url})")
        return names[-1]

    # ------------------------------------------------------------ model

    def model(self, hook: str | None = None) -> dict:
        """The run's model as its store records it: ``id``, ``revision``, ``config_hash`` (of the
        model's config, checked whenever a dictionary meets a store) and ``model_type``."""
        return dict(self.store(hook).manifest.get("model") or {})

    def model_config(self, hook: str | None = None, device: str = "auto", dtype: str = "float32",
                     path: str | None = None) -> ModelConfig:
        """The run's model as its store's manifest records it: id and revision (``path`` replaces
        the id with a local copy of the same model)."""
        return config_from_manifest(self.store(hook).manifest, device=device, dtype=dtype, path=path)
