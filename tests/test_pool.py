"""The Ray actor pool: same store as in-process, exactly-once after killed actors and drivers."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import sample_texts, write_jsonl

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import remove_orphans, run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore


def make_config(tmp_path, model_folder, corpus, run_name: str, actors: int, docs_per_shard: int = 8) -> HarvestConfig:
    return HarvestConfig(run=str(tmp_path / run_name), model=ModelConfig(path=str(model_folder)), hook="resid_post.1",
                         corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=docs_per_shard),
                         context_length=32, batch_tokens=64, progress_seconds=0.5,
                         workers=WorkersConfig(actors=actors, cpus_per_actor=1)).validate()


def store_table(url: str) -> pa.Table:
    store = ActivationStore(url)
    tables = [store.read_part(commit) for commit in store.commits()]
    return pa.concat_tables(tables).sort_by([("doc_id", "ascending"), ("position", "ascending")])


def assert_exactly_once(table: pa.Table, reference: pa.Table) -> None:
    keys = np.stack([table["doc_id"].to_numpy(), table["position"].to_numpy()], axis=1)
    assert len(np.unique(keys, axis=0)) == len(keys), "a (doc_id, position) is stored twice"
    assert table.num_rows == reference.num_rows
    for column in ("doc_id", "position", "token_id"):
        assert table[column].equals(reference[column]), column


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool-corpus")
    return write_jsonl(folder / "docs.jsonl", sample_texts(120, seed=7))


@pytest.fixture(scope="module")
def reference(tiny_models, corpus, tmp_path_factory):
    """The same harvest run in-process, without Ray: what every other run must equal."""
    config = make_config(tmp_path_factory.mktemp("reference"), tiny_models["llama"], corpus, "run", actors=0)
    return store_table(run_harvest(config).store_url)


def test_ray_pool_writes_the_same_store_as_in_process(ray_cluster, tiny_models, corpus, reference, tmp_path):
    summary = run_harvest(make_config(tmp_path, tiny_models["llama"], corpus, "run", actors=2))
    table = store_table(summary.store_url)
    assert_exactly_once(table, reference)
    activations = np.frombuffer(table["activation"].combine_chunks().buffers()[1], dtype=np.float16)
    expected = np.frombuffer(reference["activation"].combine_chunks().buffers()[1], dtype=np.float16)
    np.testing.assert_allclose(activations, expected, rtol=2e-3, atol=2e-3)
    manifest = ActivationStore(summary.store_url).manifest
    assert manifest["complete"] and manifest["statistics"]["tokens"] == reference.num_rows
    # A second run finds every shard committed and does nothing.
    again = run_harvest(make_config(tmp_path, tiny_models["llama"], corpus, "run", actors=2))
    assert again.shards_done == 0 and again.shards_skipped == summary.shards_total


def test_killed_actor_is_replaced_and_its_shard_redone_once(ray_cluster, tiny_models, corpus, reference, tmp_path):
    killed: list[int] = []

    def kill_one_actor_mid_shard(snapshot: dict) -> None:
        for actor in snapshot["actors"]:
            if not killed and actor["shard"] is not None:
                os.kill(actor["pid"], signal.SIGKILL)
                killed.append(actor["pid"])

    config = make_config(tmp_path, tiny_models["llama"], corpus, "run", actors=2, docs_per_shard=30)
    summary = run_harvest(config, on_progress=kill_one_actor_mid_shard)
    assert killed, "the test never saw an actor mid-shard"
    assert summary.actor_restarts >= 1
    assert_exactly_once(store_table(summary.store_url), reference)
    store = ActivationStore(summary.store_url)
    assert len(store.commits()) == summary.shards_total
    # What the killed attempt left is debris of that attempt only: never a committed part, always a
    # part (or its temporary file) of its own attempt id, at most one per kill; the next harvest
    # removes it.
    committed_attempts = {commit.part.removesuffix(".parquet") for commit in store.commits()}
    orphans = store.orphans()
    assert len(orphans) <= len(killed)
    for name in orphans:
        assert re.fullmatch(r"shard-\d{6}-[0-9a-f]{12}\.parquet(\.[0-9a-f]{8}\.tmp)?", name), name
        assert name.split(".parquet")[0] not in committed_attempts, name
    assert remove_orphans(store) == len(orphans) and store.orphans() == []


def test_killed_driver_then_rerun_gives_every_token_once(ray_cluster, tiny_models, corpus, reference, tmp_path):
    config = make_config(tmp_path, tiny_models["llama"], corpus, "run", actors=1, docs_per_shard=8)
    command = [sys.executable, "-m", "lexica", "harvest", "--model", config.model.path, "--hook", config.hook,
               "--corpus", str(corpus), "--run", config.run, "--context-length", "32", "--batch-tokens", "64",
               "--docs-per-shard", "8", "--actors", "1", "--set", "ray.num_cpus=2"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = os.path.join(config.run, "activations", "resid_post.1", "commits")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.isdir(commits) and len([n for n in os.listdir(commits) if n.endswith(".json")]) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the driver finished before it was killed: " + process.stderr.read().decode()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started, like a lost machine
        process.wait()
    committed_before = len([n for n in os.listdir(commits) if n.endswith(".json")])
    assert 0 < committed_before < 15
    summary = run_harvest(config)
    assert summary.shards_skipped >= committed_before
    assert_exactly_once(store_table(summary.store_url), reference)


def test_actor_that_cannot_start_stops_the_harvest_with_its_reason(ray_cluster, tiny_models, corpus, tmp_path):
    import shutil

    from lexica.harvest.pool import HarvestError

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # config and tokenizer still load
    config = make_config(tmp_path, broken, corpus, "run", actors=2)
    with pytest.raises(HarvestError, match="a harvest actor failed to start: .*(safetensors|header|Error)") as caught:
        run_harvest(config)
    assert "\n" not in str(caught.value)  # one line for people, not Ray's whole traceback
    commits = os.path.join(config.run, "activations", "resid_post.1", "commits")
    assert not os.path.isdir(commits) or not os.listdir(commits)


def test_actors_and_threads_default_to_the_cluster(tiny_models, corpus, tmp_path):
    from lexica.harvest.config import sized_for

    config = make_config(tmp_path, tiny_models["llama"], corpus, "run", actors=1)
    defaults = dataclasses.replace(config, workers=WorkersConfig())

    def sized(nodes):
        workers = sized_for(defaults, nodes).workers
        return workers.actors, workers.cpus_per_actor

    assert sized([{"CPU": 2, "GPU": 0}]) == (1, 2.0)  # this machine: one copy, every core
    assert sized([{"CPU": 16, "GPU": 0}, {"CPU": 4, "GPU": 0}]) == (3, 4.0)  # 2 x 8 and 1 x 4 fit in 4 each
    assert sized([{"CPU": 32, "GPU": 4}, {"CPU": 8, "GPU": 0}]) == (4, 8.0)  # one per GPU
    assert sized_for(config, [{"CPU": 64, "GPU": 8}]).workers.actors == 1  # explicit values stay
    cpu_only = dataclasses.replace(defaults, model=dataclasses.replace(defaults.model, device="cpu"))
    assert sized_for(cpu_only, [{"CPU": 16, "GPU": 2}]).workers.actors == 2  # GPUs unused: by CPUs
