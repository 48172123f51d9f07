"""Training-step throughput: Lexica's TopK step against a minimal PyTorch step and two peers, in one process.

One dictionary (TopK, d_in 512, 4096 latents, k 32, batch 4096, fp32) trained on the same
synthetic data (a known sparse dictionary: 16384 unit directions, 20-40 active per vector with
power-law frequencies, a mean offset and noise), the same number of steps for every variant:

(a) minimal PyTorch: dense pre-activations, top-k, codes scattered into a dense tensor, dense
    decode matmul, plain autograd, Adam; no AuxK
(b) Lexica: ``lexica.train.step.train_step`` on ``build('topk')``, dead mask from ``FiringTracker``
(c) SAELens 6.54.12: ``TopKTrainingSAE`` driven through ``SAETrainer.step`` (its defaults, but the
    same lr, b_dec at the data mean and the same dead-latent window)
(d) sparsify 1.3.3: ``SparseCoder`` with its default optimiser (SignSGD in ScheduleFree), AuxK 1/32

(a), (b), (c) use Adam at a constant 2e-4/sqrt(latents/2^14); every b_dec starts at the data mean.
Variants run interleaved, one step of each in turn, in ``--repeats`` rounds of ``--steps`` steps, so
drift on a noisy machine hits all alike. The best and median round rates are printed, against (a)
and against the machine ceiling (a plain fp32 [batch, d_in] x [d_in, latents] matmul measured
between rounds, 17.9 GFLOP per step of 4096 for a step that exploits sparsity). FVU, L0 and dead latents are
measured on held-out vectors after the same number of steps, so speed is compared at equal quality.

``store``: Lexica fed through ``train.data.shuffled_batches`` from a Parquet store (a local folder
and a moto S3 server on 127.0.0.1), read in the step or through ``train.data.Prefetcher`` as
``train_worker`` does, against the same step fed from in-memory tensors; prints the ratio and the
fraction of step time spent blocked in ``next(batches)``.

Peers stay out of Lexica's dependencies: they live in ``--peers-venv`` (``--setup-peers`` makes it)
and the script re-executes itself there when this interpreter cannot import them.
Usage: python bench/train.py [--steps 20] [--repeats 3] [--only a,b,c,d,store] [--quick] [--profile]
       python bench/train.py --real [...]: quality per token on real activations (bench/quality.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from s3_local import start_moto

from lexica.run import store_url
from lexica.store import ActivationStore, write_store
from lexica.train.architectures import build
from lexica.train.data import Prefetcher, normalisation_scale, shuffled_batches
from lexica.train.memory import retain_freed_memory
from lexica.train.optimizers import new_optimizer
from lexica.train.step import FiringTracker, train_step

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

PEERS = {"c": "sae_lens", "d": "sparsify"}  # variant -> module it needs
PEER_PACKAGES = ["torch==2.13.0", "sae-lens==6.54.12", "eai-sparsify==1.3.3",
                 # what Lexica's store and this script need beyond what the peers pull in
                 "xxhash>=3.4", "s3fs>=2024.6", "moto[server]>=5.2.5"]
AUX_COEFFICIENT = 1 / 32
HOOK = "resid_post.0"


@dataclasses.dataclass(frozen=True)
class Sizes:
    d_in: int = 512
    d_sae: int = 4096
    k: int = 32
    batch: int = 4096
    true_latents: int = 16384
    active: tuple[int, int] = (20, 40)
    pool_batches: int = 48  # 8 MiB each; the training stream cycles through them
    held_out_batches: int = 4
    store_block_batches: int = 8  # buffer_rows = this x batch; a measuring round spans one block
    store_shards: int = 4

    @property
    def flop_per_step(self) -> float:
        """17.9 GFLOP for 4096 x 512 -> 4096 (the dense encoder matmul plus the k-sparse rest), scaled."""
        return 17.9e9 * self.batch * self.d_in * self.d_sae / (4096 * 512 * 4096)


QUICK = Sizes(d_in=64, d_sae=512, k=8, batch=512, true_latents=1024, active=(3, 6), pool_batches=8,
              held_out_batches=2, store_block_batches=4)


# ---------------------------------------------------------------- peers' virtual environment


def peers_missing(only: set[str]) -> list[str]:
    return [module for key, module in PEERS.items() if key in only and importlib.util.find_spec(module) is None]


def setup_peers(venv: str) -> None:
    """A separate venv with the peers, and this checkout of Lexica on top without its own deps."""
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + PEER_PACKAGES, check=True)
    subprocess.run(pip + ["--no-deps", "-e", REPO], check=True)


def maybe_reexec_in_peers_venv(args: argparse.Namespace, only: set[str]) -> None:
    missing = peers_missing(only)
    if not missing or os.environ.get("LEXICA_BENCH_REEXEC"):
        return
    python = os.path.join(args.peers_venv, "bin", "python")
    if not os.path.exists(python):
        if not args.setup_peers:
            print(f"{', '.join(missing)} not importable here and no peers venv at {args.peers_venv}; those variants "
                  f"are skipped. Create it with: python bench/train.py --setup-peers (or: python -m venv "
                  f"{args.peers_venv} && {python} -m pip install {shlex.join(PEER_PACKAGES)} && "
                  f"{python} -m pip install --no-deps -e {REPO})")
            return
        setup_peers(args.peers_venv)
    print(f"re-running under {python} (peers: {', '.join(missing)})", flush=True)
    # This checkout first on the path, whatever checkout the venv's editable install points at.
    env = {**os.environ, "LEXICA_BENCH_REEXEC": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    os.execve(python, [python, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env)


# ---------------------------------------------------------------- data


def synthetic_batches(sizes: Sizes, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Vectors built from a known sparse dictionary, scaled so E|x| = sqrt(d_in) (as Lexica normalises)."""
    generator = torch.Generator().manual_seed(seed)
    truth = F.normalize(torch.randn(sizes.true_latents, sizes.d_in, generator=generator), dim=1)
    # Power-law frequencies like real features: a few common directions, a long tail of rare ones.
    frequency = torch.arange(1, sizes.true_latents + 1, dtype=torch.float32).pow(-0.6)
    offset = torch.randn(sizes.d_in, generator=generator)  # real residual streams have a large mean
    low, high = sizes.active
    batches = []
    for _ in range(count):
        latents = torch.multinomial(frequency, sizes.batch * high, replacement=True, generator=generator)
        magnitudes = torch.rand(sizes.batch, high, generator=generator) * 2 + 0.1
        counts = torch.randint(low, high + 1, (sizes.batch, 1), generator=generator)
        magnitudes *= torch.arange(high) < counts
        vectors = F.embedding_bag(latents.view(sizes.batch, high), truth, per_sample_weights=magnitudes, mode="sum")
        batches.append(vectors + offset + 0.05 * torch.randn(sizes.batch, sizes.d_in, generator=generator))
    scale = math.sqrt(sizes.d_in) / float(batches[0].norm(dim=1).mean())
    return [batch * scale for batch in batches]


# ---------------------------------------------------------------- the variants


class Variant(Protocol):
    def step(self, batch: torch.Tensor) -> None: ...

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, code values [B, k], code latent ids [B, k])"""


class DenseReference:
    """(a) The textbook step: every product dense, autograd does the rest."""

    def __init__(self, sizes: Sizes, mean: torch.Tensor, lr: float):
        decoder = torch.randn(sizes.d_sae, sizes.d_in, generator=torch.Generator().manual_seed(0))
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = decoder.requires_grad_()
        self.W_enc = decoder.detach().t().clone().requires_grad_()
        self.b_enc = torch.zeros(sizes.d_sae, requires_grad=True)
        self.b_dec = mean.clone().requires_grad_()
        self.k = sizes.k
        self.optimizer = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=lr, eps=6.25e-10)

    def forward(self, x: torch.Tensor):
        pre_activations = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre_activations.topk(self.k, dim=1, sorted=False)
        values = values.relu()
        codes = torch.zeros_like(pre_activations).scatter(1, indices, values)
        return codes @ self.W_dec + self.b_dec, values, indices

    def step(self, batch: torch.Tensor) -> None:
        reconstruction, _, _ = self.forward(batch)
        loss = (reconstruction - batch).pow(2).sum() / (batch - batch.mean(0)).pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # unit-norm decoder rows, as every other variant keeps them
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec
            self.optimizer.step()
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def evaluate(self, x):
        return self.forward(x)


class LexicaStep:
    """(b) What ``lexica.train.worker.train_worker`` does per step, minus the schedule and the logging."""

    def __init__(self, sizes: Sizes, mean: torch.Tensor, lr: float, dead_tokens: int, variance: float):
        # As train_worker does. Process-wide: every variant measured in this process gets it too.
        retain_freed_memory()
        self.dictionary = build("topk", d_in=sizes.d_in, d_sae=sizes.d_sae, k=sizes.k, seed=0)
        with torch.no_grad():
            self.dictionary.b_dec.copy_(mean)
        self.optimizer = new_optimizer(self.dictionary, lr)
        self.tracker = FiringTracker.create(sizes.d_sae, "cpu")
        self.dead_tokens, self.variance = dead_tokens, variance

    def step(self, batch: torch.Tensor) -> None:
        dead_mask = self.tracker.tokens_since_fired >= self.dead_tokens
        output = train_step(self.dictionary, self.optimizer, batch, dead_mask if dead_mask.any() else None,
                            self.variance)
        self.tracker.update(output.fired, tokens=len(batch))

    @torch.no_grad()
    def evaluate(self, x):
        code = self.dictionary.encode(x)
        return self.dictionary.decode(code), code.values, code.indices


class SAELensStep:
    """(c) SAELens's own per-step sequence from ``SAETrainer.fit``, on tensors instead of a model."""

    def __init__(self, sizes: Sizes, mean: torch.Tensor, lr: float, dead_steps: int, total_steps: int):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(0)
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=sizes.d_in, d_sae=sizes.d_sae, k=sizes.k,
                                                         dtype="float32", device="cpu"))
        with torch.no_grad():  # its default is zero, which leaves most latents dead in a short run
            self.sae.b_dec.copy_(mean)
        config = SAETrainerConfig(total_training_samples=total_steps * sizes.batch,
                                  train_batch_size_samples=sizes.batch, lr=lr, lr_end=lr,
                                  dead_feature_window=dead_steps, logger=LoggingConfig(log_to_wandb=False))
        self.trainer = SAETrainer(cfg=config, sae=self.sae, data_provider=iter(()))
        self.k = sizes.k

    def step(self, batch: torch.Tensor) -> None:
        self.trainer.maybe_reset_sparsity()
        self.trainer.step(batch)
        self.trainer.n_training_steps += 1  # fit() counts steps; step() does not

    @torch.no_grad()
    def evaluate(self, x):
        codes = self.sae.encode(x)
        values, indices = codes.topk(self.k, dim=1)
        return self.sae.decode(codes), values, indices


class SparsifyStep:
    """(d) sparsify's trainer body for one hookpoint (its trainer itself needs a Hugging Face model)."""

    def __init__(self, sizes: Sizes, mean: torch.Tensor, dead_tokens: int, aux_coefficient: float = AUX_COEFFICIENT):
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        torch.manual_seed(0)
        self.sae = SparseCoder(sizes.d_in, SparseCoderConfig(num_latents=sizes.d_sae, k=sizes.k), device="cpu",
                               dtype=torch.float32)
        with torch.no_grad():
            self.sae.b_dec.copy_(mean)
        lr = 5e-3 / math.sqrt(sizes.d_sae / 2**14)  # its default for the signum optimiser
        self.optimizer = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95)
        self.optimizer.train()
        self.tokens_since_fired = torch.zeros(sizes.d_sae, dtype=torch.long)
        self.dead_tokens, self.aux_coefficient = dead_tokens, aux_coefficient

    def step(self, batch: torch.Tensor) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        output = self.sae(x=batch, y=batch, dead_mask=self.tokens_since_fired > self.dead_tokens,
                          total_variance=(batch - batch.mean(0)).pow(2).sum())
        (output.fvu + self.aux_coefficient * output.auxk_loss).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            self.tokens_since_fired += len(batch)
            self.tokens_since_fired[output.latent_indices.flatten()] = 0

    @torch.no_grad()
    def evaluate(self, x):
        self.optimizer.eval()  # schedule-free: quality is that of the averaged weights
        values, indices, _ = self.sae.encode(x)
        reconstruction = self.sae.decode(values, indices)
        self.optimizer.train()
        return reconstruction, values, indices


# ---------------------------------------------------------------- measuring


def run_round(variants: dict[str, Variant], feeds: dict[str, Iterator[torch.Tensor]],
              steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """``steps`` steps of every variant, one step of each in turn, so that drift on a noisy machine
    lands on all alike. Returns per variant the seconds spent, and the part spent waiting in ``next``."""
    spent = dict.fromkeys(variants, 0.0)
    waited = dict.fromkeys(variants, 0.0)
    for _ in range(steps):
        for name, variant in variants.items():
            started = time.perf_counter()
            batch = next(feeds[name])
            fetched = time.perf_counter()
            variant.step(batch)
            spent[name] += time.perf_counter() - started
            waited[name] += fetched - started
    return spent, waited


def matmul_gflops(sizes: Sizes, trials: int = 5) -> float:
    left, right = torch.randn(sizes.batch, sizes.d_in), torch.randn(sizes.d_in, sizes.d_sae)
    left @ right
    best = math.inf
    for _ in range(trials):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return 2 * sizes.batch * sizes.d_in * sizes.d_sae / best / 1e9


@torch.no_grad()
def quality(variant: Variant, held_out: list[torch.Tensor], d_sae: int) -> tuple[float, float, float]:
    """(FVU, L0, dead fraction) on held-out vectors; dead = fired on none of them."""
    error = variance = active = 0.0
    fired = torch.zeros(d_sae, dtype=torch.long)
    for x in held_out:
        reconstruction, values, indices = variant.evaluate(x)
        error += float((reconstruction - x).pow(2).sum())
        variance += float((x - x.mean(0)).pow(2).sum())
        active += float((values > 0).sum())
        fired += torch.bincount(indices[values > 0], minlength=d_sae)
    rows = sum(len(x) for x in held_out)
    return error / variance, active / rows, float((fired == 0).float().mean())


def build_variants(only: set[str], sizes: Sizes, mean: torch.Tensor, variance: float,
                   total_steps: int) -> dict[str, Variant]:
    lr = 2e-4 / math.sqrt(sizes.d_sae / 2**14)
    # Lexica's default: a latent is dead after a quarter of the run's tokens without firing.
    dead_tokens = min(10_000_000, max(sizes.batch, total_steps * sizes.batch // 4))
    makers = {
        "a": ("a minimal PyTorch (dense)", lambda: DenseReference(sizes, mean, lr)),
        "b": ("b Lexica train_step", lambda: LexicaStep(sizes, mean, lr, dead_tokens, variance)),
        "c": ("c SAELens 6.54.12", lambda: SAELensStep(sizes, mean, lr, dead_tokens // sizes.batch, total_steps)),
        "d": ("d sparsify 1.3.3", lambda: SparsifyStep(sizes, mean, dead_tokens)),
    }
    variants = {}
    for key, (name, make) in makers.items():
        if key not in only:
            continue
        if key in PEERS and importlib.util.find_spec(PEERS[key]) is None:
            print(f"skipping {name}: {PEERS[key]} is not importable (see --setup-peers)")
            continue
        try:
            variants[name] = make()
        except Exception as error:  # a peer's API moved: say so and measure the rest
            print(f"skipping {name}: {type(error).__name__}: {error}")
    return variants


def compare_steps(args: argparse.Namespace, sizes: Sizes, only: set[str], pool: list[torch.Tensor],
                  held_out: list[torch.Tensor]) -> None:
    total_steps = args.warmup + args.repeats * args.steps
    mean = pool[0].mean(0)
    variance = float(torch.cat(pool[:4]).var(0, unbiased=False).sum())
    variants = build_variants(only, sizes, mean, variance, total_steps)
    if not variants:
        return
    feeds = {name: itertools.cycle(pool) for name in variants}  # the same batch sequence for every variant
    rates: dict[str, list[float]] = {name: [] for name in variants}
    gflops = [matmul_gflops(sizes)]
    run_round(variants, feeds, args.warmup)
    for round_index in range(args.repeats):
        spent, _ = run_round(variants, feeds, args.steps)
        for name, seconds in spent.items():
            rates[name].append(args.steps * sizes.batch / seconds)
        gflops.append(matmul_gflops(sizes))
        print(f"round {round_index + 1}/{args.repeats}: " +
              ", ".join(f"{name.split()[0]} {values[-1]:,.0f}/s" for name, values in rates.items()), flush=True)
    ceiling = max(gflops) * 1e9 / sizes.flop_per_step * sizes.batch
    reference = max(rates.get("a minimal PyTorch (dense)", [math.nan]))
    print(f"\nmatmul fp32 [{sizes.batch},{sizes.d_in}]x[{sizes.d_in},{sizes.d_sae}]: best {max(gflops):.1f} GFLOP/s, "
          f"median {statistics.median(gflops):.1f}; ceiling {ceiling:,.0f} vectors/s "
          f"({sizes.flop_per_step / 1e9:.3g} GFLOP per step of {sizes.batch})")
    print(f"{total_steps} steps per variant ({args.warmup} warm-up + {args.repeats} rounds x {args.steps} timed, "
          f"variants alternating step by step), {len(pool)} training batches cycled; quality on "
          f"{len(held_out) * sizes.batch:,} held-out vectors, dead = fired on none of them\n")
    print("| variant | vectors/s best | median | vs a | of ceiling | FVU | L0 | dead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, variant in variants.items():
        fvu, l0, dead = quality(variant, held_out, sizes.d_sae)
        best = max(rates[name])
        versus = "-" if math.isnan(reference) else f"{best / reference:.2f}x"
        print(f"| {name} | {best:,.0f} | {statistics.median(rates[name]):,.0f} | {versus} | "
              f"{best / ceiling:.0%} | {fvu:.3f} | {l0:.1f} | {dead:.1%} |")


# ---------------------------------------------------------------- store-fed training


def write_bench_store(run_url: str, vectors: torch.Tensor, shards: int, storage_options: dict) -> str:
    """A complete fp16 store holding ``vectors``, as a harvest writes it (512-token windows, row
    groups of 4096 tokens)."""
    return write_store(store_url(run_url, HOOK), vectors, HOOK, shards=shards, model={"id": "synthetic"},
                       storage_options=storage_options)


def compare_store(args: argparse.Namespace, sizes: Sizes, pool: list[torch.Tensor]) -> None:
    block_rows = sizes.store_block_batches * sizes.batch
    store_batches = sizes.store_block_batches * sizes.store_shards
    vectors = torch.cat([pool[i % len(pool)] for i in range(store_batches)])
    steps = sizes.store_block_batches  # a round = one shuffle block: it pays exactly one block read
    scratch = tempfile.mkdtemp(prefix="lexica-bench-train-")
    server = None
    feeds: dict[str, Iterator[torch.Tensor]] = {"in-memory tensors": itertools.cycle(pool)}
    try:
        started = time.perf_counter()
        local_url = write_bench_store(os.path.join(scratch, "run"), vectors, sizes.store_shards, {})
        stores = {"local": ActivationStore(local_url)}
        print(f"\nlocal store: {len(vectors):,} rows fp16 written in {time.perf_counter() - started:.1f}s")
        try:
            server, options = start_moto()
            started = time.perf_counter()
            stores["S3 (moto, 127.0.0.1)"] = ActivationStore(
                write_bench_store("s3://lexica-bench/run", vectors, sizes.store_shards, options), options)
            print(f"S3 store written in {time.perf_counter() - started:.1f}s")
        except Exception as error:  # moto missing or failing: measure the local store alone
            print(f"skipping the S3 store: {type(error).__name__}: {error}")
        for where, store in stores.items():
            scale = normalisation_scale(store)
            feeds[f"{where} store, read in the step"] = shuffled_batches(store, sizes.batch, block_rows, 0, scale)
            feeds[f"{where} store, Prefetcher (as train_worker)"] = Prefetcher(
                shuffled_batches(store, sizes.batch, block_rows, 0, scale))
        mean, variance = pool[0].mean(0), float(torch.cat(pool[:4]).var(0, unbiased=False).sum())
        lr = 2e-4 / math.sqrt(sizes.d_sae / 2**14)
        # No AuxK here: it switches on with the first dead latent, which depends on the data order,
        # and would make the steps' work differ between sources; only the feeding should differ.
        learners: dict[str, Variant] = {name: LexicaStep(sizes, mean, lr, 10**15, variance) for name in feeds}
        spent: dict[str, list[float]] = {name: [] for name in feeds}
        waited: dict[str, list[float]] = {name: [] for name in feeds}
        for name in feeds:
            run_round({name: learners[name]}, feeds, args.warmup)
        # Sources alternate by whole rounds, not steps: a prefetch thread then reads ahead during its
        # own source's steps (it finishes the next block within its round) and slows no other source.
        rounds = 2 * args.repeats  # short rounds, many of them: drift between rounds averages out
        for _ in range(rounds):
            for name in feeds:
                seconds, waits = run_round({name: learners[name]}, feeds, steps)
                spent[name].append(seconds[name])
                waited[name].append(waits[name])
        memory = spent["in-memory tensors"]
        print(f"\nLexica fed by each source, {rounds} rounds of {steps} steps per source, sources alternating "
              f"by round (buffer_rows {block_rows:,}: one shuffle block read per round)\n")
        print("| source | vectors/s median | best | vs in-memory (median) | data wait |")
        print("|---|---:|---:|---:|---:|")
        for name in feeds:
            rates = [steps * sizes.batch / seconds for seconds in spent[name]]
            ratios = [reference / seconds for reference, seconds in zip(memory, spent[name], strict=True)]
            print(f"| {name} | {statistics.median(rates):,.0f} | {max(rates):,.0f} | "
                  f"{statistics.median(ratios):.2f} | {sum(waited[name]) / sum(spent[name]):.1%} |")
        print("\n(target: store-fed >= 0.9 of in-memory; data wait = time blocked in next(batches) over all step "
              "time, so 1 - wait is what the data path allows)")
    finally:
        for feed in feeds.values():
            if isinstance(feed, Prefetcher):
                feed.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------- where Lexica's step spends its time


def step_part(event) -> str:
    """Which part of a training step an operator event belongs to, from its chain of callers."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    for name in names:
        if name.startswith("Optimizer.step#"):
            return "Adam step"
        if name.startswith("autograd::engine::evaluate_function: "):
            function = name.split(": ", 1)[1]
            return {"_SelectWithSparseGradBackward": "backward: encoder grads (embedding_bag by latent)",
                    "_SparseDecodeBackward": "backward: sparse decode (values + decoder grad, C kernel)",
                    "EmbeddingBagBackward0": "backward: sparse decode (embedding_bag)"}.get(
                function, "backward: losses, elementwise")
    for name in reversed(names):  # outermost first: aten::addmm inside aten::linear etc.
        part = {"aten::addmm": "forward: dense encoder matmul", "aten::topk": "forward: top-k selection",
                # train.selection: group maxima, then the candidates' values and columns
                "aten::amax": "forward: top-k selection", "aten::gather": "forward: top-k selection",
                "lexica::topk_rows": "forward: top-k selection",  # the C kernel (train/native.py)
                "aten::embedding_bag": "forward: sparse decode (embedding_bag)",
                "aten::_embedding_bag": "forward: sparse decode (embedding_bag)",
                "aten::_embedding_bag_forward_only": "forward: sparse decode (embedding_bag)"}.get(name)
        if part:
            return part
    return "forward: losses, masks, bookkeeping"


def profile_lexica(sizes: Sizes, pool: list[torch.Tensor], steps: int = 4) -> None:
    """Where Lexica's step spends its time, with no dead latents and with AuxK on."""
    from torch.profiler import ProfilerActivity, profile

    mean, variance = pool[0].mean(0), float(torch.cat(pool[:4]).var(0, unbiased=False).sum())
    lr = 2e-4 / math.sqrt(sizes.d_sae / 2**14)
    # dead_tokens 0 counts every latent dead: AuxK then runs at its full k_aux (d_in / 2), as it
    # does whenever at least that many latents are dead.
    for label, dead_tokens in (("no dead latents", 10**15), ("AuxK on (every latent counted dead)", 0)):
        learner = LexicaStep(sizes, mean, lr, dead_tokens, variance)
        for batch in pool[:2]:
            learner.step(batch)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for batch in pool[2:2 + steps]:
                learner.step(batch)
        wall = (time.perf_counter() - started) / steps
        parts: dict[str, float] = {}
        operators: dict[str, float] = {}
        for event in profiler.events():
            parts[step_part(event)] = parts.get(step_part(event), 0.0) + event.self_cpu_time_total
            operators[event.name] = operators.get(event.name, 0.0) + event.self_cpu_time_total
        total = sum(parts.values())
        print(f"\nLexica step, {label}: {wall * 1e3:,.0f} ms/step wall under the profiler, {steps} steps\n")
        print("| part of the step | share of CPU time | ms/step |")
        print("|---|---:|---:|")
        for part, micros in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"| {part} | {micros / total:.1%} | {micros / steps / 1e3:.1f} |")
        top = sorted(operators.items(), key=lambda item: -item[1])[:8]
        print("top operators (self time): " + ", ".join(f"{name} {micros / total:.0%}" for name, micros in top))


def main() -> None:
    if "--real" in sys.argv[1:]:  # the real-activation quality benchmark: bench/quality.py
        import quality

        quality.main([argument for argument in sys.argv[1:] if argument != "--real"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--only", default="a,b,c,d,store", help="comma list of a,b,c,d,store")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--profile", action="store_true", help="also print where Lexica's step spends its time")
    parser.add_argument("--peers-venv", default=os.path.join(BENCH, ".venv-peers"))
    parser.add_argument("--setup-peers", action="store_true", help="create --peers-venv if it does not exist")
    args = parser.parse_args()
    only = {part.strip() for part in args.only.split(",") if part.strip()}
    if args.setup_peers and not os.path.exists(os.path.join(args.peers_venv, "bin", "python")):
        setup_peers(args.peers_venv)  # also on its own: `make peers` runs --setup-peers --only none
    maybe_reexec_in_peers_venv(args, only)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else Sizes()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    batches = synthetic_batches(sizes, sizes.pool_batches + sizes.held_out_batches)
    pool, held_out = batches[:sizes.pool_batches], batches[sizes.pool_batches:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_in {sizes.d_in}, {sizes.d_sae} latents, "
          f"k {sizes.k}, batch {sizes.batch}, fp32; data made in {time.perf_counter() - started:.1f}s", flush=True)
    if only & {"a", "b", "c", "d"}:
        compare_steps(args, sizes, only, pool, held_out)
    if "store" in only:
        compare_store(args, sizes, pool)
    if args.profile:
        profile_lexica(sizes, pool)
    # Another busy process on a small machine distorts 2-thread ATen ops badly (sort most of all).
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; {time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
