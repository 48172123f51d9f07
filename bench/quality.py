"""Dictionary quality per token on real activations: held-out FVU at equal tokens and at equal wall
time, Lexica's optimisers against sparsify's default trainer and SAELens.

Data: the demo model (SmolLM2-135M-Instruct, block 15, d_model 576) harvested by ``lexica harvest``
over the first 30 State of the Union addresses (the demo's own store: training) and over the next
10 addresses (held out: scoring). Both stores are made once under ``--work`` and reused.

Every variant trains a TopK dictionary (4,608 latents, k 32, batch 4,096 by default) on the same
sequence of batches (the training rows shuffled, epoch after epoch, normalised to E‖x‖ = √d as
Lexica trains), one step of each variant in turn, so drift on this noisy machine lands on all
alike. Only the steps are timed. Every ``--eval-every`` steps and at the end each variant is
scored on the held-out rows (FVU, L0, dead = latents that fired on none of them); schedule-free
variants are scored with their averaged weights, as they are exported.

Variants (``--variants``, comma-separated):
- ``lexica:OPTIMIZER:SCHEDULE[:lr=X][:momentum=Y][:dead=TOKENS]``: Lexica's ``train_step`` with its
  optimiser and schedule exactly as ``train_worker`` drives them (warm-up, decay or averaging;
  AuxK on dead latents). ``lr`` is a multiple of the optimiser's default (``lr=2`` doubles it).
- ``sparsify``: sparsify 1.3.3's default trainer body (SignSGD in schedule-free averaging,
  momentum 0.95, lr 5e-3/√(latents/2¹⁴), no AuxK: its ``auxk_alpha`` defaults to 0), fed the same
  normalised rows; ``sparsify-raw`` feeds it the raw activations, as its own trainer does.
- ``saelens``: SAELens 6.54.12's ``TopKTrainingSAE`` through ``SAETrainer.step``, Adam at Lexica's
  Adam lr held constant, ``b_dec`` at the data mean.

Equal wall time: each variant's held-out FVU at the last evaluation it reached within the
seconds the first variant needed for the whole run.

Usage: python bench/train.py --real [--tokens 1250000] [--variants ...] (or python bench/quality.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time

import torch

from lexica.store import ActivationStore
from lexica.train.data import data_variance, normalisation_scale
from lexica.train.plan import default_lr
from lexica.train.step import learning_rate

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)


def _step_benchmark():
    """bench/train.py, whose variants (Lexica's step, SAELens, sparsify) this benchmark drives; loaded
    by path, as its name is also that of the train stage."""
    sys.path.insert(0, BENCH)  # for its own imports (s3_local)
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(BENCH, "train.py"))
    module = sys.modules["bench_train"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


steps = _step_benchmark()
LexicaStep, SAELensStep, SparsifyStep, Sizes = steps.LexicaStep, steps.SAELensStep, steps.SparsifyStep, steps.Sizes

CORPUS = os.path.join(REPO, "assets", "corpora", "sotu.jsonl")
DEMO_CONFIG = os.path.join(REPO, "examples", "demo.yaml")
HOOK = "resid_post.15"
DEFAULT_VARIANTS = ("lexica:adam:warmup-decay,lexica:adam:constant,lexica:signsgd:schedule-free,"
                    "sparsify,saelens")


# ---------------------------------------------------------------- data


def harvested_store(work: str, name: str, documents: range) -> ActivationStore:
    """The store of ``documents`` (rows of the demo corpus), harvested once with the demo's settings."""
    run = os.path.join(work, name)
    url = os.path.join(run, "activations", HOOK)
    if os.path.exists(os.path.join(url, "manifest.json")) and ActivationStore(url).complete:
        return ActivationStore(url)
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, f"{name}.jsonl")
    with open(CORPUS, encoding="utf-8") as source, open(corpus, "w", encoding="utf-8") as target:
        for index, line in enumerate(source):
            if index in documents:
                target.write(line)
    print(f"harvesting {name}: addresses {documents.start + 1}-{documents.stop} into {run}", flush=True)
    subprocess.run([sys.executable, "-m", "lexica", "harvest", "--config", DEMO_CONFIG, "--run", run,
                    "--corpus", corpus, "--set", f"corpus.max_documents={len(documents)}"], check=True)
    return ActivationStore(url)


def addresses(text: str) -> range:
    """'1-30' → documents 0..29 of the corpus."""
    first, _, last = text.partition("-")
    return range(int(first) - 1, int(last or first))


def load_rows(store: ActivationStore) -> torch.Tensor:
    return torch.cat([batch.activation.float() for batch in store.iter_batches(batch_rows=65536)])


class BatchSequence:
    """The training rows shuffled epoch after epoch (seeded): every variant replays the same batches."""

    def __init__(self, rows: torch.Tensor, batch: int, seed: int = 0):
        self.rows, self.batch = rows, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(rows), generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch > len(self.order):
            self.order, self.position = torch.randperm(len(self.rows), generator=self.generator), 0
        chosen = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        return self.rows[chosen]


# ---------------------------------------------------------------- Lexica, as train_worker drives it


@dataclasses.dataclass
class LexicaSettings:
    optimizer: str
    schedule: str  # warmup-decay, schedule-free, or constant (warmup-decay without warm-up or decay)
    lr_multiple: float = 1.0
    momentum: float = 0.9
    dead_tokens: int | None = None

    @classmethod
    def parse(cls, text: str) -> LexicaSettings:
        _, optimizer, schedule, *options = text.split(":")
        values = dict(option.split("=", 1) for option in options)
        return cls(optimizer, schedule, float(values.get("lr", 1.0)), float(values.get("momentum", 0.9)),
                   int(values["dead"]) if "dead" in values else None)


class LexicaVariant(LexicaStep):
    def __init__(self, sizes: Sizes, mean: torch.Tensor, variance: float, settings: LexicaSettings,
                 total_steps: int):
        from lexica.train.optimizers import new_optimizer

        # Lexica's default: a latent is dead after a quarter of the run's tokens without firing.
        dead_tokens = settings.dead_tokens or min(10_000_000, max(sizes.batch, total_steps * sizes.batch // 4))
        self.peak_lr = default_lr(settings.optimizer, sizes.d_sae) * settings.lr_multiple
        super().__init__(sizes, mean, self.peak_lr, dead_tokens, variance)
        schedule = "warmup-decay" if settings.schedule == "constant" else settings.schedule
        self.optimizer = new_optimizer(self.dictionary, self.peak_lr, settings.optimizer, schedule, settings.momentum)
        self.settings, self.total_steps, self.step_index = settings, total_steps, 0
        # As plan_training: warm-up of 100 steps, at most a tenth of the run; decay over the last fifth.
        self.warmup = 1 if settings.schedule == "constant" else max(1, min(100, total_steps // 10))
        self.decay = 0.2 if settings.schedule == "warmup-decay" else 0.0

    def step(self, batch: torch.Tensor) -> None:
        lr = learning_rate(self.step_index, self.total_steps, self.peak_lr, self.warmup, self.decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.dictionary.begin_step(self.step_index, self.total_steps)
        super().step(batch)
        self.step_index += 1

    @torch.no_grad()
    def evaluate(self, x):
        from lexica.train.optimizers import evaluation_weights, training_weights

        evaluation_weights(self.optimizer)
        try:
            return super().evaluate(x)
        finally:
            training_weights(self.optimizer)


class ScaledInput:
    """A variant fed activations at another scale (``factor`` × the normalised rows); its
    reconstruction is scaled back, so it is scored on the same rows as every other variant."""

    def __init__(self, variant, factor: float):
        self.variant, self.factor = variant, factor

    def step(self, batch: torch.Tensor) -> None:
        self.variant.step(batch * self.factor)

    def evaluate(self, x):
        reconstruction, values, indices = self.variant.evaluate(x * self.factor)
        return reconstruction / self.factor, values, indices


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def held_out_quality(variant, held_out: torch.Tensor, d_sae: int, chunk: int = 4096) -> dict:
    error = 0.0
    active = 0.0
    fired = torch.zeros(d_sae, dtype=torch.long)
    for start in range(0, len(held_out), chunk):
        x = held_out[start:start + chunk]
        reconstruction, values, indices = variant.evaluate(x)
        error += float((reconstruction - x).double().pow(2).sum())
        active += float((values > 0).sum())
        fired += torch.bincount(indices[values > 0], minlength=d_sae)
    variance = float((held_out.double() - held_out.double().mean(0)).pow(2).sum())
    return {"fvu": error / variance, "l0": active / len(held_out), "dead": float((fired == 0).float().mean())}


def build(name: str, sizes: Sizes, mean: torch.Tensor, variance: float, total_steps: int, raw_factor: float):
    if name.startswith("lexica:"):
        return LexicaVariant(sizes, mean, variance, LexicaSettings.parse(name), total_steps)
    if name in ("sparsify", "sparsify-raw"):
        step = SparsifyStep(sizes, mean * (raw_factor if name == "sparsify-raw" else 1.0), dead_tokens=10_000_000,
                            aux_coefficient=0.0)
        return ScaledInput(step, raw_factor) if name == "sparsify-raw" else step
    if name == "saelens":
        lr = default_lr("adam", sizes.d_sae)
        return SAELensStep(sizes, mean, lr, dead_steps=max(1, total_steps // 4), total_steps=total_steps)
    raise SystemExit(f"unknown variant {name!r}; see --help")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(BENCH, ".real-activations"),
                        help="where the two stores are harvested (once) and the results written")
    parser.add_argument("--train-addresses", default="1-30", help="addresses (1-based, inclusive) to train on: the "
                        "demo's 30 by default, ~14 passes at 1.25M tokens; 41-145 is ~1.25M tokens, one pass")
    parser.add_argument("--held-out-addresses", default="31-40", help="addresses to score on")
    parser.add_argument("--tokens", type=int, default=1_250_000, help="training tokens per variant")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers-venv", default=os.path.join(BENCH, ".venv-peers"))
    parser.add_argument("--setup-peers", action="store_true")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    args.only = {"d"} if any(name.startswith("sparsify") for name in names) else set()
    args.only |= {"c"} if "saelens" in names else set()
    # Harvested here, before any re-run under the peers' venv (which has no Ray).
    train_documents, held_out_documents = addresses(args.train_addresses), addresses(args.held_out_addresses)
    if set(train_documents) & set(held_out_documents):
        raise SystemExit("--train-addresses and --held-out-addresses overlap")
    training_store = harvested_store(args.work, f"train-{args.train_addresses}", train_documents)
    held_out_store = harvested_store(args.work, f"held-out-{args.held_out_addresses}", held_out_documents)
    steps.maybe_reexec_in_peers_venv(args, args.only)
    torch.set_num_threads(args.threads)
    scale = normalisation_scale(training_store)
    rows = load_rows(training_store) * scale
    held_out = load_rows(held_out_store) * scale  # the training scale: as the exported dictionary applies it
    sizes = Sizes(d_in=training_store.d_model, d_sae=args.latents, k=args.k, batch=args.batch)
    total_steps = max(1, args.tokens // args.batch)
    mean, variance = rows[:args.batch].mean(0), data_variance(training_store, scale)
    training_sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))[:16384]]
    started_at, load_at_start = time.time(), os.getloadavg()[0]
    print(f"training rows {len(rows):,} (addresses {args.train_addresses}), held-out rows {len(held_out):,} "
          f"(addresses {args.held_out_addresses}); "
          f"d {sizes.d_in}, {sizes.d_sae} latents, k {sizes.k}, batch {sizes.batch}, {total_steps} steps "
          f"({total_steps * sizes.batch:,} tokens); torch {torch.__version__}, {args.threads} threads", flush=True)
    variants = {name: build(name, sizes, mean, variance, total_steps, 1 / scale) for name in names}
    feeds = {name: BatchSequence(rows, sizes.batch) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    history: dict[str, list[dict]] = {name: [] for name in names}
    for step in range(1, total_steps + 1):
        for name, variant in variants.items():
            batch = feeds[name].next()
            began = time.perf_counter()
            variant.step(batch)
            seconds[name] += time.perf_counter() - began
        if step % args.eval_every == 0 or step == total_steps:
            for name, variant in variants.items():
                # FVU on training rows too: rising held-out FVU with falling training FVU is overfitting.
                seen = held_out_quality(variant, training_sample, sizes.d_sae)["fvu"]
                history[name].append({"step": step, "seconds": seconds[name], "train_fvu": seen,
                                      **held_out_quality(variant, held_out, sizes.d_sae)})
            print(f"step {step}/{total_steps} held-out (training) FVU: " + ", ".join(
                f"{name} {history[name][-1]['fvu']:.3f} ({history[name][-1]['train_fvu']:.3f})" for name in names),
                flush=True)
    report(names, history, sizes, total_steps, args, load_at_start, started_at)


def report(names, history, sizes, total_steps, args, load_at_start, started_at) -> None:
    budget = history[names[0]][-1]["seconds"]  # equal wall time: what the first variant needed
    sparsify = history.get("sparsify", [None])[-1]
    print(f"\n{total_steps} steps x {sizes.batch} tokens; held-out FVU on addresses {args.held_out_addresses}; "
          f"training on addresses {args.train_addresses}; dead = fired on none "
          f"of the held-out rows; equal wall time = {budget:.0f} s ({names[0]}'s whole run)\n")
    print("| variant | s/step | vs sparsify speed | FVU (equal tokens) | training FVU | L0 | dead | "
          "FVU at equal wall time (step) | best FVU (step) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        final = history[name][-1]
        per_step = final["seconds"] / final["step"]
        speed = "-" if sparsify is None else f"{sparsify['seconds'] / sparsify['step'] / per_step:.2f}x"
        within = [entry for entry in history[name] if entry["seconds"] <= budget * 1.001]
        at_budget = f"{within[-1]['fvu']:.3f} ({within[-1]['step']})" if within else "-"
        best = min(history[name], key=lambda entry: entry["fvu"])
        print(f"| {name} | {per_step:.3f} | {speed} | {final['fvu']:.4f} | {final['train_fvu']:.4f} | "
              f"{final['l0']:.1f} | {final['dead']:.2%} | {at_budget} | {best['fvu']:.4f} ({best['step']}) |")
    out = os.path.join(args.work, f"quality-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started_at))}.json")
    with open(out, "w") as handle:
        json.dump({"args": {key: value for key, value in vars(args).items() if key != "only"},
                   "history": history}, handle, indent=1)
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; {time.time() - started_at:.0f} s in all; history in {out}")


if __name__ == "__main__":
    main()
