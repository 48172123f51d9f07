"""Metrics mirrored to MLflow (a real local tracking store), continued by the evaluation."""

from __future__ import annotations

import mlflow
import pytest
import torch
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from lexica.train.config import TrainConfig
from lexica.train.fit import fit


def test_metrics_reach_an_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a plain folder store: no server needed
    vectors = synthetic(3000, ground_truth(), torch.Generator().manual_seed(11))
    url = write_synthetic_store(str(tmp_path / "run"), vectors, shards=2)
    tracking = f"file://{tmp_path / 'mlruns'}"
    summary = fit(TrainConfig(run=str(tmp_path / "run"), store=url, width="2x", k=4, batch_size=256, buffer_rows=1024,
                              workers=0, eval_tokens=0, log_every=3, trackers=["mlflow"], tracking_uri=tracking,
                              experiment="lexica-test"))
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("lexica-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == summary["name"] and run.data.params["k"] == "4"
    history = client.get_metric_history(run.info.run_id, "fvu")
    assert [point.step for point in history] == [3, 6, 9, 11]
    assert history[-1].value == pytest.approx(summary["final"]["fvu"])


def wandb_records(run_file):
    """The protobuf records of an offline W&B run file: a 7-byte header, then 32 KiB blocks of
    records each framed by checksum (4 bytes), length (2, little-endian) and type (1: whole,
    2/3/4: first/middle/last piece of a record split across blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        piece = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_metrics_reach_an_offline_wandb_run(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")  # files on disk: no account, no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    vectors = synthetic(3000, ground_truth(), torch.Generator().manual_seed(12))
    url = write_synthetic_store(str(tmp_path / "run"), vectors, shards=2)
    config = TrainConfig(run=str(tmp_path / "run"), store=url, width="2x", k=4, batch_size=256, buffer_rows=1024,
                         workers=0, eval_tokens=0, log_every=3, trackers=["wandb"], experiment="lexica-test")
    summary = fit(config)
    run_ids = json.loads((tmp_path / "run" / "dictionaries" / summary["name"] / "trackers.json").read_text())
    run_files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_ids['wandb']}/run-*.wandb"))
    assert run_files, list((tmp_path / "wandb").iterdir())
    steps, fvu = [], []
    names = set()
    for record in wandb_records(run_files[0]):
        if record.WhichOneof("record_type") == "run":
            names.add(record.run.display_name)
        if record.WhichOneof("record_type") == "history":
            # W&B writes a metric's name as `key` or as the parts of `nested_key`, by version.
            values = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            if "fvu" in values:
                steps.append(record.history.step.num)
                fvu.append(values["fvu"])
    assert names == {summary["name"]}
    assert steps == [3, 6, 9, 11]
    assert fvu[-1] == pytest.approx(summary["final"]["fvu"])
