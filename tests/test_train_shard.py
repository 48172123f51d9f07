"""Latent sharding (train/shard.py): S shard workers over gloo train exactly the dictionary one
worker trains (within float32 rounding: sums are taken in another order), for every architecture,
with AuxK's dead latents spread over the shards; 2 copies × 2 shards equal one worker."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from safetensors.torch import load_file
from test_train_ray import config_for, kill_once_written
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from lexica.errors import ConfigError
from lexica.train.architectures import build
from lexica.train.fit import fit
from lexica.train.shard import SLICED, new_shard, whole
from lexica.train.step import train_step

D_IN, D_SAE, K, BATCH, STEPS = 16, 64, 6, 96, 6


def data(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, D_IN, generator=generator) * 2 + 0.5


def dead_mask(step: int) -> torch.Tensor | None:
    """A fixed pattern of dead latents on some steps (every shard holds some), none on others."""
    if step % 3 == 2:
        return None
    return torch.arange(D_SAE) % 5 == step % 5


def train(architecture: str, shard, copy: int = 0, copies: int = 1, budget: int | None = None,
          options: dict | None = None, dead: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    dictionary = build(architecture, d_in=D_IN, d_sae=D_SAE, k=K, seed=3, options=options, shard=shard)
    if budget:
        dictionary.encoder_budget = budget
    dictionary.initialise_from(data(-1))
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-2)
    rows = slice(copy * BATCH // copies, (copy + 1) * BATCH // copies)
    for step in range(STEPS):
        mask = dead_mask(step) if dead else None
        if mask is not None:
            mask = mask[shard.start:shard.stop]
        dictionary.begin_step(step, STEPS)
        output = train_step(dictionary, optimizer, data(step)[rows], mask, variance=4.0)
        assert torch.isfinite(output.loss)
    return {name: tensor.detach().clone() for name, tensor in dictionary.state_dict().items()}


def _worker(rank: int, world: int, shards: int, port: int, architecture: str, options: dict | None, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shard = new_shard(rank, world, shards, D_SAE)
        # AuxK's loss is normalised by each copy's own batch FVU, so copies (as DDP workers) equal one
        # worker only without dead latents.
        copies = world // shards
        state = train(architecture, shard, copy=rank // shards, copies=copies, options=options, dead=copies == 1)
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train_sharded(tmp_path, architecture: str, world: int, shards: int, options: dict | None = None) -> list[dict]:
    mp.spawn(_worker, args=(world, shards, free_port(), architecture, options, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def assert_same_dictionary(whole_state: dict, shard_states: list[dict], shards: int) -> None:
    for name, expected in whole_state.items():
        if name in SLICED:
            got = torch.cat([state[name] for state in shard_states[:shards]], dim=SLICED[name])
        else:
            got = shard_states[0][name]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    for copy in range(1, len(shard_states) // shards):  # every copy holds the same dictionary
        for index in range(shards):
            for name, tensor in shard_states[copy * shards + index].items():
                torch.testing.assert_close(tensor, shard_states[index][name], msg=f"copy {copy}: {name}")


ARCHITECTURES = [("topk", None), ("batchtopk", None), ("relu", None), ("jumprelu", None),
                 ("matryoshka", {"prefixes": [8, 24]})]


@pytest.mark.parametrize(("architecture", "options"), ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_two_and_four_shards_train_the_dictionary_one_worker_trains(tmp_path, architecture, options):
    reference = train(architecture, whole(D_SAE), options=options)
    for shards in (2, 4):
        folder = tmp_path / f"s{shards}"
        folder.mkdir()
        assert_same_dictionary(reference, train_sharded(folder, architecture, shards, shards, options), shards)


def test_two_copies_of_two_shards_train_what_one_worker_trains(tmp_path):
    reference = train("topk", whole(D_SAE), dead=False)
    assert_same_dictionary(reference, train_sharded(tmp_path, "topk", 4, 2), 2)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "relu"])
def test_encoder_in_row_chunks_trains_the_same_dictionary(architecture):
    """A memory budget smaller than the batch's pre-activations: the encoder runs over row chunks."""
    reference = train(architecture, whole(D_SAE))
    chunked = train(architecture, whole(D_SAE), budget=4 * D_SAE * 10)  # 10 rows per chunk
    for name, tensor in reference.items():
        torch.testing.assert_close(chunked[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    raw = synthetic(12_000, ground_truth(), torch.Generator().manual_seed(5)) * 10
    return write_synthetic_store(str(tmp_path_factory.mktemp("shard-store") / "run"), raw, shards=3)


def sharded_config(run: str, store: str, tokens: int | None = None, checkpoint_every: int = 10, **changes):
    config = config_for(run, store, workers=2, tokens=tokens, checkpoint_every=checkpoint_every)
    return dataclasses.replace(config, shards=2, cpus_per_worker=1, **changes)


def test_a_two_shard_ray_job_trains_and_exports_what_one_worker_does(ray_cluster, store_url, tmp_path):
    # Both read the same two data lanes: one worker both, the two shards of the one copy both. Each
    # job is a sweep of two dictionaries (one Ray Train job each way keeps this test short).
    sweep = [{"k": 4}, {"architecture": "batchtopk", "k": 8}]
    one = fit(dataclasses.replace(config_for(str(tmp_path / "one"), store_url, workers=1, data_lanes=2), sweep=sweep))
    two = fit(dataclasses.replace(sharded_config(str(tmp_path / "two"), store_url), sweep=sweep))
    assert [summary["name"] for summary in one["dictionaries"]] == [summary["name"] for summary in two["dictionaries"]]
    # Each export, streamed shard by shard into one file, equals the unsharded job's.
    for unsharded, sharded in zip(one["dictionaries"], two["dictionaries"], strict=True):
        exported = [load_file(os.path.join(summary["folder"], "final", "sae_weights.safetensors"))
                    for summary in (unsharded, sharded)]
        assert exported[0].keys() == exported[1].keys()
        for name, tensor in exported[0].items():
            torch.testing.assert_close(exported[1][name], tensor, rtol=1e-4, atol=1e-5,
                                       msg=f"{unsharded['name']}: {name}")
        configs = [json.load(open(os.path.join(summary["folder"], "final", "cfg.json")))
                   for summary in (unsharded, sharded)]
        assert {**configs[1], "metadata": None} == {**configs[0], "metadata": None}
    # One file per shard in each checkpoint, each holding half the latents and their optimiser state.
    checkpoints = sorted(path for path in glob.glob(os.path.join(two["folder"], "checkpoints", "checkpoint_*"))
                         if os.path.isdir(path))
    newest = os.path.join(checkpoints[-1], two["dictionaries"][0]["name"])
    assert sorted(os.listdir(newest)) == ["shard-0-of-2.pt", "shard-1-of-2.pt"]
    d_sae = one["dictionaries"][0]["dictionary"].d_sae
    for index in range(2):
        state = torch.load(os.path.join(newest, f"shard-{index}-of-2.pt"), weights_only=True)
        assert state["dictionary"]["W_dec"].shape[0] == d_sae // 2
        moments = [tensor for entry in state["optimizer"]["state"].values() for tensor in entry.values()
                   if torch.is_tensor(tensor) and tensor.dim() == 2]
        assert moments and all(d_sae // 2 in tensor.shape and d_sae not in tensor.shape for tensor in moments)
    # The same run with another number of shards is refused, naming what would resume it.
    with pytest.raises(ConfigError, match="train.shards = 2, this job has 1; resume with --shards 2"):
        fit(dataclasses.replace(config_for(str(tmp_path / "two"), store_url, workers=2), cpus_per_worker=1,
                                sweep=sweep))


def test_killed_sharded_job_resumes_to_the_same_weights(ray_cluster, store_url, tmp_path):
    tokens = 40_000  # 78 steps: killed at the first checkpoint (step 20), well before the end
    reference = fit(sharded_config(str(tmp_path / "reference"), store_url, tokens=tokens, checkpoint_every=20))
    run = str(tmp_path / "killed")
    command = [sys.executable, "-m", "lexica", "train", "--store", store_url, "--run", run, "--width", "4x", "--k", "8",
               "--batch-size", "512", "--lr", "0.002", "--tokens", str(tokens), "--workers", "2", "--shards", "2",
               "--cpus-per-worker", "1", "--set", "buffer_rows=4096", "--set", "log_every=5",
               "--set", "checkpoint_every=20", "--set", "eval_tokens=0"]
    kill_once_written(command, os.path.join(run, "dictionaries", "*", "checkpoints", "checkpoint_*", "shard-1-of-2.pt"))
    resumed = fit(sharded_config(run, store_url, tokens=tokens, checkpoint_every=20))
    for name, tensor in reference["dictionary"].state_dict().items():  # the exports
        torch.testing.assert_close(resumed["dictionary"].state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def dense(code, d_sae: int) -> torch.Tensor:
    matrix = torch.zeros(len(code.values), d_sae)
    return matrix.scatter_add_(1, code.indices, code.values)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu", "jumprelu"])
def test_inference_encodes_in_row_chunks_within_the_budget(architecture):
    torch.manual_seed(0)
    dictionary = build(architecture, d_in=D_IN, d_sae=D_SAE, k=K, seed=3)
    dictionary.initialise_from(data(-1))
    if architecture == "batchtopk":
        dictionary.threshold.fill_(0.5)
    x = data(0)
    whole_code = dictionary.encode(x)
    dictionary.encoder_budget = 4 * D_SAE * 10  # 10 rows at a time
    chunked = dictionary.encode(x)
    # The same codes, to the last bits a matmul of fewer rows may round differently.
    torch.testing.assert_close(dense(chunked, D_SAE), dense(whole_code, D_SAE))
    torch.testing.assert_close(dictionary.decode(chunked), dictionary.decode(whole_code))
