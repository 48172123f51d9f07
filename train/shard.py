"""Latent sharding: one dictionary's latents split into S contiguous slices over S workers.

A shard worker holds its slice of ``W_enc``, ``b_enc``, ``W_dec`` (and ``threshold``) and that
slice's optimiser state; ``b_dec`` and the input statistics are replicated. Within a step the
shard group (the S workers holding one copy of the dictionary) exchanges only what selection
needs (each shard's best candidates per token) and the partial reconstructions, which are summed.
Every worker of the group then holds the same error and computes the same loss, so the gradient
of the loss with respect to a shard's partial reconstruction is the gradient with respect to the
sum: the sum's backward is the identity and gradients reach exactly the shards that own the
winners. The replica group (the workers holding the same slice, one per data-parallel copy)
averages gradients as data-parallel training always does.

With one shard every function here is the identity and costs nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The tensors a shard holds a slice of, and the dimension they are sliced along (latents).
SLICED = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}


@dataclass(frozen=True)
class Shard:
    """Which slice of the latents a worker holds, and its process groups (None: the default group
    for replicas, no group at all for one shard)."""

    index: int = 0
    count: int = 1
    d_sae: int = 0  # the whole dictionary's width
    group: object | None = None  # the shard group: the other slices of this copy
    replicas: object | None = None  # the replica group: this slice in the other copies

    @property
    def width(self) -> int:
        return self.d_sae // self.count

    @property
    def start(self) -> int:
        return self.index * self.width

    @property
    def stop(self) -> int:
        return self.start + self.width

    @property
    def sharded(self) -> bool:
        return self.count > 1


def whole(d_sae: int) -> Shard:
    """The unsharded dictionary."""
    return Shard(0, 1, d_sae)


def check_width(d_sae: int, shards: int) -> None:
    from lexica.errors import ConfigError

    if shards < 1 or d_sae % shards:
        raise ConfigError(f"a dictionary of {d_sae} latents cannot be split into {shards} equal shards; choose "
                          "train.shards dividing the width")


def replica_groups(world: int, shards: int) -> tuple[list[list[int]], list[list[int]]]:
    """(shard groups, replica groups) of ranks 0..world-1: rank r holds slice r % shards of copy
    r // shards, so the slices of one copy are neighbouring ranks (on one machine when they fit)."""
    copies = world // shards
    shard_groups = [[copy * shards + index for index in range(shards)] for copy in range(copies)]
    replica_groups_ = [[copy * shards + index for copy in range(copies)] for index in range(shards)]
    return shard_groups, replica_groups_


def of_width(shard: Shard, d_sae: int) -> Shard:
    """The same slice and groups for a dictionary of ``d_sae`` latents (a sweep's dictionaries
    share the job's groups)."""
    check_width(d_sae, shard.count)
    return dataclasses.replace(shard, d_sae=d_sae)


def new_shard(rank: int, world: int, shards: int, d_sae: int = 0) -> Shard:
    """This rank's shard, creating the job's process sub-groups (every rank must call it, in the
    same order: ``new_group`` is collective)."""
    if shards == 1:
        return whole(d_sae)
    if world % shards:
        from lexica.errors import ConfigError

        raise ConfigError(f"train.workers = {world} is not a multiple of train.shards = {shards}")
    check_width(d_sae, shards)
    shard_groups, replica_ranks = replica_groups(world, shards)
    mine = {}
    for ranks in shard_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["group"] = group
    for ranks in replica_ranks:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["replicas"] = group
    return Shard(rank % shards, shards, d_sae, mine["group"], mine["replicas"])


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum over the shard group. Backward: the identity (every member computes the
    same loss from the sum, so each already holds the sum's whole gradient)."""

    @staticmethod
    def forward(ctx, tensor, group):
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradientSumOverShards(torch.autograd.Function):
    """Forward: the identity. Backward: the gradient summed over the shard group. For replicated
    parameters that each shard uses differently (b_dec as the encoder's input offset, through
    each shard's own winners)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_shards(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The shard group's sum of ``tensor`` (partial reconstructions, a loss term's parts)."""
    return _SumOverShards.apply(tensor, shard.group) if shard.sharded else tensor


def gradient_summed(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``tensor`` itself, whose gradient will be summed over the shard group."""
    return _GradientSumOverShards.apply(tensor, shard.group) if shard.sharded else tensor


@torch.no_grad()
def total(value: torch.Tensor, shard: Shard, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A statistic reduced over the shard group (no gradient)."""
    if not shard.sharded:
        return value
    value = value.clone()
    dist.all_reduce(value, op=op, group=shard.group)
    return value


@torch.no_grad()
def gathered(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """[S, *shape]: every shard's ``tensor`` (equal shapes), in shard order."""
    parts = [torch.empty_like(tensor) for _ in range(shard.count)]
    dist.all_gather(parts, tensor.contiguous(), group=shard.group)
    return torch.stack(parts)


@torch.no_grad()
def winners_per_row(values: torch.Tensor, latents: torch.Tensor, k: int, shard: Shard):
    """The exact top ``k`` per row across shards, from each shard's own top candidates (``values``
    [B, c] at its local ``latents``; -inf pads a shard with fewer than c): returns (rows, local
    latents, values) of the winners this shard owns, rows ascending."""
    global_latents = latents + shard.start
    all_values = gathered(values, shard).permute(1, 0, 2).reshape(len(values), -1)  # [B, S·c]
    all_latents = gathered(global_latents, shard).permute(1, 0, 2).reshape(len(values), -1)
    best, columns = all_values.topk(k, dim=1, sorted=False)
    chosen = all_latents.gather(1, columns)
    owned = (chosen >= shard.start) & (chosen < shard.stop)
    rows, slots = owned.nonzero(as_tuple=True)
    return rows, chosen[rows, slots] - shard.start, best[rows, slots]


@torch.no_grad()
def batch_threshold(values: torch.Tensor, count: int, shard: Shard) -> torch.Tensor:
    """The ``count``-th largest of every shard's candidate ``values`` together: the batch-wide
    selection threshold (each shard offers its own ``count`` best, so the union holds the winners)."""
    everything = gathered(values, shard).reshape(-1)
    return everything.topk(count, sorted=False).values.min()


def average_gradients(module: torch.nn.Module, shard: Shard) -> None:
    """Average every gradient over the replica group, one parameter at a time (a flat buffer
    would double the gradients' memory, which is what sharding saves)."""
    group = shard.replicas
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    copies = dist.get_world_size(group)
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)
            parameter.grad /= copies
