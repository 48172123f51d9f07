"""Latent sharding (train/shard.py): S shard workers over gloo train exactly the dictionary one
worker trains (within float32 rounding: sums are taken in another order), for every architecture,
with AuxK's dead latents spread over the shards; 2 copies × 2 shards equal one worker."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lexica.train.architectures import build
from lexica.train.shard import new_shard, whole
from lexica.train.step import train_step

D_IN, D_SAE, K, BATCH, STEPS = 16, 64, 6, 96, 6


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


SLICED = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


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
