"""Chaos: one multi-hook harvest into S3 (moto on 127.0.0.1) survives 6 actor kills and 6 driver
kills at random moments, each followed by a re-run; every (doc_id, position) of every hook is
stored exactly once, every part matches its commit, and no orphan outlives the final run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import sample_texts, write_jsonl

from lexica import storage
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore

HOOKS = "resid_post.0,mlp_in.1,mlp_out.1"
ROUNDS = 6  # each kills one actor, then the driver
# In these rounds the driver dies while its pool is still replacing the killed actor (0.5-3 s after
# the kill); in the others once more shards are committed.
EARLY_DRIVER_KILLS = {2, 5}


def config_for(model: Path, corpus: Path, run: str, storage_options: dict, actors: int) -> HarvestConfig:
    return HarvestConfig(run=run, model=ModelConfig(path=str(model)), hook=HOOKS,
                         corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=1), context_length=32,
                         batch_tokens=64, storage_options=storage_options, progress_seconds=0.5,
                         workers=WorkersConfig(actors=actors, cpus_per_actor=1, max_attempts=4)).validate()


def sorted_table(url: str, storage_options: dict | None = None) -> pa.Table:
    store = ActivationStore(url, storage_options)
    table = pa.concat_tables([store.read_part(commit) for commit in store.commits()])
    return table.sort_by([("doc_id", "ascending"), ("position", "ascending")])


def harvest_actor_pids() -> list[int]:
    """Processes Ray titled after the harvest actor (``ray::HarvestWorker...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::HarvestWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_random_kills_of_actors_and_drivers_leave_every_token_once(ray_cluster, s3_server, tiny_models, tmp_path):
    import ray

    endpoint, options = s3_server
    rng = random.Random(20261206)
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(96, seed=21))
    run = "s3://lexica-test/chaos"
    reference = run_harvest(config_for(tiny_models["llama"], corpus, str(tmp_path / "reference"), {}, actors=0))
    fs, _ = storage.url_to_fs(run, options)
    commits_folder = f"lexica-test/chaos/activations/{HOOKS.split(',')[0]}/commits"

    def committed() -> int:
        try:
            return len(fs.ls(commits_folder, refresh=True))
        except FileNotFoundError:
            return 0

    command = [sys.executable, "-m", "lexica", "harvest", "--model", str(tiny_models["llama"]), "--hook", HOOKS,
               "--corpus", str(corpus), "--run", run, "--context-length", "32", "--batch-tokens", "64",
               "--docs-per-shard", "1", "--actors", "2", "--cpus-per-actor", "1",
               "--ray-address", ray.get_runtime_context().gcs_address,
               "--set", f"storage_options={{endpoint_url: '{endpoint}'}}", "--set", "workers.max_attempts=4"]

    def wait_for_commits(process: subprocess.Popen, more: int, limit: float = 90.0) -> bool:
        """Until ``more`` shards beyond now are committed (plus a random instant); False if the driver ended."""
        target, deadline = committed() + more, time.monotonic() + limit
        while committed() < target and time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        return process.poll() is None

    actor_kills = driver_kills = 0
    for round_index in range(ROUNDS):
        process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            # An actor, at a random moment once work is flowing: the pool re-queues its shard.
            if wait_for_commits(process, rng.randint(1, 4)):
                victims = harvest_actor_pids()
                if victims:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    actor_kills += 1
            # The driver, at a random moment while the pool recovers or after it has.
            if round_index in EARLY_DRIVER_KILLS:
                time.sleep(rng.uniform(0.5, 3.0))
                alive = process.poll() is None
            else:
                alive = wait_for_commits(process, rng.randint(1, 5))
            if alive:
                driver_kills += 1
            else:
                pytest.fail("the harvest finished before the chaos did: " + process.stderr.read().decode()[-2000:])
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the driver, like a lost machine (its actors die with it)
            process.wait()
    committed_before_final = committed()
    summary = run_harvest(config_for(tiny_models["llama"], corpus, run, options, actors=2))
    print(f"\nchaos: {actor_kills} actors and {driver_kills} drivers killed; {committed_before_final} of "
          f"{summary.shards_total} shards committed before the final run; {summary.orphans_removed} orphaned "
          f"part(s) removed by it; {summary.actor_restarts} actor restarts in it")
    assert actor_kills == ROUNDS and driver_kills == ROUNDS
    assert 0 < committed_before_final < summary.shards_total
    for local, remote in zip(reference.stores, summary.stores, strict=True):
        store = ActivationStore(remote, options)
        report = store.verify()  # every committed part matches its record's size and checksum
        assert report["problems"] == [] and report["orphans"] == []
        assert store.complete and len(store.commits()) == summary.shards_total
        table, expected = sorted_table(remote, options), sorted_table(local)
        keys = np.stack([table["doc_id"].to_numpy(), table["position"].to_numpy()], axis=1)
        assert len(np.unique(keys, axis=0)) == len(keys), "a (doc_id, position) is stored twice"
        for column in ("doc_id", "position", "token_id"):
            assert table[column].equals(expected[column]), column
