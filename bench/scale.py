"""Latent sharding on this machine: step throughput and memory per worker (issue 15).

d_model 576, TopK (k 32) trained with Lexica's own step and Adam on synthetic vectors (a mean plus
Gaussian noise: selection costs do not depend much on the data), every worker a process of its
own (``torch.multiprocessing`` over gloo on 127.0.0.1, as Ray Train's workers are):

- ``step``: (a) the whole dictionary, 1 worker × 2 threads, against (b) 2 shards × 1 thread, same
  width (default 2^16) and batch; rounds alternate a and b. Target: (b) ≥ 0.85 × (a) in vectors/s.
- ``wide``: a 2^20-latent dictionary in 2 shards trained for ``--wide-steps`` steps (default 200),
  against the whole dictionary in one worker for a few steps (its memory is reached by its first
  step; it may not fit at all, which is then reported). Target: peak RSS per shard worker
  ≤ 0.55 × the whole dictionary's.

Each worker also times its own encoder matmul ([batch, 576] × [576, its latents], fp32, its
threads): the ceiling its step could reach if the matmul were all it did; the table reports the
fraction of that ceiling each configuration reaches.

Usage: python bench/scale.py [--only step,wide] [--width 65536] [--batch 4096] [--steps 8] [--rounds 2]
                             [--wide-batch 128] [--wide-steps 200] [--wide-budget-mb 256] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D_MODEL, K = 576, 32


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def batches(batch: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    mean = torch.randn(D_MODEL, generator=generator)
    return [mean + torch.randn(batch, D_MODEL, generator=generator) for _ in range(count)]


def matmul_seconds(rows: int, width: int) -> float:
    """Median time of the encoder matmul alone, [rows, 576] x [576, width], with this process's threads."""
    from torch.utils.benchmark import Timer

    inputs = {"x": torch.randn(rows, D_MODEL), "weight": torch.randn(D_MODEL, width)}
    return Timer("x @ weight", globals=inputs, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.5).median


def _worker(rank: int, world: int, port: int, width: int, batch: int, steps: int, threads: int, budget_mb: int,
            out: str):
    from lexica.train.architectures import build
    from lexica.train.memory import retain_freed_memory
    from lexica.train.optimizers import new_optimizer
    from lexica.train.shard import new_shard
    from lexica.train.step import train_step

    torch.set_num_threads(threads)
    retain_freed_memory()  # as train_worker does
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = new_shard(rank, world, world, width)
        data = batches(batch, 4)
        dictionary = build("topk", d_in=D_MODEL, d_sae=width, k=K, seed=0, shard=shard)
        dictionary.encoder_budget = budget_mb << 20  # the dense pre-activations a step holds at once
        dictionary.initialise_from(data[0])
        optimizer = new_optimizer(dictionary, 1e-4)
        train_step(dictionary, optimizer, data[0], None, variance=1.0)  # warm-up: allocations, kernels
        if world > 1:
            dist.barrier()
        started = time.perf_counter()
        for step in range(steps):
            output = train_step(dictionary, optimizer, data[step % len(data)], None, variance=1.0)
            if rank == 0 and steps >= 20 and (step + 1) % 10 == 0:  # long runs show that they move
                elapsed = time.perf_counter() - started
                print(f"  [{world} worker(s), {width:,} latents] step {step + 1}/{steps}, "
                      f"{elapsed / (step + 1):.2f} s/step", file=sys.stderr, flush=True)
        if world > 1:
            dist.barrier()
        seconds = time.perf_counter() - started
        ceiling = batch / matmul_seconds(batch, dictionary.d_sae)
        parameters = sum(tensor.numel() * tensor.element_size() for tensor in dictionary.parameters())
        moments = sum(tensor.numel() * tensor.element_size() for entry in optimizer.state.values()
                      for tensor in entry.values() if torch.is_tensor(tensor))
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as handle:
            handle.write(f"{steps * batch / seconds} {ceiling} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} "
                         f"{parameters} {moments} {float(output.terms['fvu'])}\n")
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, width: int, batch: int, steps: int, threads: int, budget_mb: int = 1024) -> dict:
    """One configuration in fresh processes: its vectors/s, ceiling and peak RSS (the worst worker)."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_worker, args=(world, free_port(), width, batch, steps, threads, budget_mb, out), nprocs=world)
        except mp.ProcessExitedException as error:  # e.g. killed for memory
            return {"error": f"worker exited with {error.exit_code}" + (" (killed: out of memory?)"
                                                                        if error.exit_code in (-9, 137) else "")}
        rows = [list(map(float, open(os.path.join(out, f"rank{rank}.txt")).read().split())) for rank in range(world)]
    return {"vectors_per_second": min(row[0] for row in rows), "ceiling": min(row[1] for row in rows),
            "peak_rss_gb": max(row[2] for row in rows) / 2**20, "parameter_gb": rows[0][3] / 1e9,
            "optimizer_gb": rows[0][4] / 1e9, "fvu": rows[0][5]}


def row(label: str, result: dict, baseline: dict | None = None) -> str:
    if "error" in result:
        return f"| {label} | {result['error']} | | | | | |"
    ratio = f"{result['vectors_per_second'] / baseline['vectors_per_second']:.2f}" if baseline and \
        "error" not in baseline else "1.00" if baseline is None else ""
    return (f"| {label} | {result['vectors_per_second']:,.0f} | {ratio} | "
            f"{result['vectors_per_second'] / result['ceiling']:.0%} | {result['peak_rss_gb']:.2f} | "
            f"{result['parameter_gb']:.2f} + {result['optimizer_gb']:.2f} | {result['fvu']:.3f} |")


HEADER = ("| configuration | vectors/s | vs whole | of encoder-matmul ceiling | peak RSS per worker (GB) | "
          "parameters + optimiser state per worker (GB) | batch FVU |\n|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="step,wide")
    parser.add_argument("--width", type=int, default=2**16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wide-width", type=int, default=2**20)
    parser.add_argument("--wide-batch", type=int, default=128)
    parser.add_argument("--wide-steps", type=int, default=200)
    parser.add_argument("--whole-steps", type=int, default=3)
    parser.add_argument("--wide-budget-mb", type=int, default=256, help="encoder_budget_mb of the wide runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.width, args.batch, args.steps, args.rounds = 4096, 512, 2, 1
        args.wide_width, args.wide_batch, args.wide_steps, args.whole_steps = 8192, 64, 3, 2
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; d_model {D_MODEL}, TopK k {K}, Adam, fp32")
    if "step" in only:
        whole, sharded = [], []
        for _ in range(args.rounds):
            whole.append(run(1, args.width, args.batch, args.steps, threads=2))
            sharded.append(run(2, args.width, args.batch, args.steps, threads=1))
        best = [max(results, key=lambda result: result.get("vectors_per_second", 0)) for results in (whole, sharded)]
        print(f"\nstep: {args.width:,} latents, batch {args.batch:,}, {args.steps} steps, best of {args.rounds} "
              f"alternating rounds, encoder_budget_mb 1024 (the default)\n{HEADER}")
        print(row("(a) whole, 1 worker x 2 threads", best[0]))
        print(row("(b) 2 shards x 1 thread", best[1], best[0]))
    if "wide" in only:
        # A smaller pre-activation budget than the default (1 GiB): two 2^19-latent shards with Adam
        # take ~19 GB of this machine's 24 GiB before any pre-activations.
        sharded = run(2, args.wide_width, args.wide_batch, args.wide_steps, threads=1, budget_mb=args.wide_budget_mb)
        whole = run(1, args.wide_width, args.wide_batch, args.whole_steps, threads=2, budget_mb=args.wide_budget_mb)
        print(f"\nwide: {args.wide_width:,} latents, batch {args.wide_batch:,}, encoder_budget_mb "
              f"{args.wide_budget_mb}; the shards {args.wide_steps} steps, the whole dictionary {args.whole_steps}\n"
              f"{HEADER}")
        print(row("whole, 1 worker x 2 threads", whole))
        print(row("2 shards x 1 thread", sharded, whole))
        if "error" not in sharded and "error" not in whole:
            print(f"\npeak RSS per shard worker / whole: {sharded['peak_rss_gb'] / whole['peak_rss_gb']:.2f} "
                  "(target <= 0.55)")


if __name__ == "__main__":
    main()
