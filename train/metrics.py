"""A dictionary's metrics.jsonl, mirrored to the configured experiment trackers."""

from __future__ import annotations

import json

from lexica import storage
from lexica.train.plan import TrainingPlan


class MetricsLog:
    """metrics.jsonl of a dictionary, rewritten whole each time (object stores cannot append),
    mirrored to the configured experiment trackers when ``track`` is set."""

    def __init__(self, plan: TrainingPlan, track: bool = False):
        self.fs, folder = storage.url_to_fs(plan.folder, plan.config.storage_options)
        self.path = storage.join(folder, "metrics.jsonl")
        self.trackers_path = storage.join(folder, "trackers.json")
        self.lines: list[str] = []
        if storage.exists(self.fs, self.path):
            with self.fs.open(self.path, "rb") as handle:
                self.lines = handle.read().decode().splitlines()
        self.trackers = []
        if track and plan.config.trackers:
            from lexica.train.trackers import open_trackers

            run_ids = storage.read_json(self.fs, self.trackers_path) if storage.exists(self.fs, self.trackers_path) \
                else {}
            self.trackers = open_trackers(plan.config, plan.name, run_ids)
            storage.write_json(self.fs, self.trackers_path, {tracker.name: tracker.run_id for tracker in self.trackers})

    def add(self, metrics: dict) -> None:
        # A resumed run repeats nothing: drop lines from steps at or after this one.
        self.lines = [line for line in self.lines if json.loads(line)["step"] < metrics["step"]]
        self.lines.append(json.dumps(metrics))
        storage.write_bytes(self.fs, self.path, ("\n".join(self.lines) + "\n").encode())
        for tracker in self.trackers:
            tracker.log(metrics)

    def add_summary(self, values: dict, step: int) -> None:
        """Values for the trackers only (metrics.jsonl holds training lines)."""
        for tracker in self.trackers:
            tracker.log({"step": step, **values})

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    @property
    def last(self) -> dict:
        return json.loads(self.lines[-1]) if self.lines else {}
