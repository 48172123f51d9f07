"""The Ray Train job: 2 DDP workers equal 1 worker; a killed job resumes to the same weights."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from lexica.train.config import TrainConfig
from lexica.train.fit import fit


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    raw = synthetic(12_000, ground_truth(), torch.Generator().manual_seed(5)) * 10
    return write_synthetic_store(str(tmp_path_factory.mktemp("train-store") / "run"), raw, shards=3)


def config_for(run: str, store: str, workers: int, tokens: int | None = None, checkpoint_every: int = 10,
               data_lanes: int | None = None) -> TrainConfig:
    return TrainConfig(eval_tokens=0, run=run, store=store, width="4x", k=8, batch_size=512, buffer_rows=4096,
                       log_every=5, lr=2e-3, workers=workers, checkpoint_every=checkpoint_every, tokens=tokens,
                       data_lanes=data_lanes)


def test_two_ddp_workers_give_the_same_dictionary_as_one(ray_cluster, store_url, tmp_path):
    # Two data lanes: one worker reads both, each of two workers reads one (half the store).
    one = fit(config_for(str(tmp_path / "one"), store_url, workers=1, data_lanes=2))["dictionary"].state_dict()
    two = fit(config_for(str(tmp_path / "two"), store_url, workers=2))["dictionary"].state_dict()
    for name, tensor in one.items():
        # Same global batches, gradients averaged over halves: only summation order differs.
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    checkpoints = glob.glob(str(tmp_path / "two" / "dictionaries" / "*" / "checkpoints" / "checkpoint_*"))
    assert checkpoints, "Ray Train wrote no checkpoints under <run>/dictionaries/<name>/checkpoints"


def kill_once_written(command: list[str], pattern: str) -> None:
    """Run ``command`` (a training job with its own Ray) and SIGKILL its whole process group as
    soon as a file matching ``pattern`` exists (its first checkpoint)."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None and not glob.glob(pattern):
            time.sleep(0.1)
        assert process.poll() is None, "training finished before it was killed: " + process.stderr.read().decode()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver, its Ray and the workers, at once
        process.wait()


def test_killed_training_job_resumes_to_the_same_weights(ray_cluster, store_url, tmp_path):
    tokens = 40_000  # 78 steps: killed at the first checkpoint (step 20), well before the end
    reference = fit(config_for(str(tmp_path / "reference"), store_url, workers=1, tokens=tokens, checkpoint_every=20))
    run = str(tmp_path / "killed")
    command = [sys.executable, "-m", "lexica", "train", "--store", store_url, "--run", run, "--width", "4x", "--k", "8",
               "--batch-size", "512", "--lr", "0.002", "--tokens", str(tokens), "--set", "buffer_rows=4096",
               "--set", "log_every=5", "--set", "checkpoint_every=20", "--set", "workers=1", "--set", "eval_tokens=0"]
    kill_once_written(command, os.path.join(run, "dictionaries", "*", "checkpoints", "checkpoint_*", "state.pt"))
    resumed = fit(config_for(run, store_url, workers=1, tokens=tokens, checkpoint_every=20))
    for name, tensor in reference["dictionary"].state_dict().items():
        torch.testing.assert_close(resumed["dictionary"].state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    steps = [line for line in open(glob.glob(os.path.join(run, "dictionaries", "*", "metrics.jsonl"))[0])]
    assert len(steps) == len(set(steps)) == reference["steps"] // 5 + 1  # no step logged twice
