"""Metrics mirrored to MLflow (a real local tracking store), continued by the evaluation."""

from __future__ import annotations

import mlflow
import pytest
import torch
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from train.config import TrainConfig
from train.loop import fit


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
