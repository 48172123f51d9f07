"""Harvest throughput against plain transformers loops, many hooks against one, writes to S3 against
local, and store format v2 against v1: every ratio from one process run.

(a)  full model: a plain loop running every block (AutoModelForCausalLM, output_hidden_states)
(b)  plain loops that stop after the deepest hooked block (15 for c, 20 for d and e) and keep fp16
     copies of the real tokens in memory
(c)  Lexica's Ray actor pool writing one hook (resid_post.15), sized by its defaults, on the long
     document set; also in-process (actors: 0) on the short set
(d)  Lexica's pool writing N = 4 hooks (resid_post.5,10,15,20) in one pass
(e)  the same 4 hooks as 4 separate single-hook harvests
(s3) (c)'s harvest into a moto S3 server on 127.0.0.1 against a local folder, with the share of
     the run spent waiting on the writer (commit records' write_wait_seconds)
(v2) store format v2 against v1: bytes per element, and reading into float32 torch tensors per
     CPU-second (ActivationStore.iter_batches, from the page cache)

Pool rates are given end to end (cluster start and model load included), as start-up seconds
(end to end minus the shards' own seconds per actor) and steady (tokens over the shards' seconds
per actor). Plain loops use the same windows (BOS + context - 1 tokens) and torch threads as the
pool's actor. Usage: python bench/harvest.py [--documents 20] [--short 4] [--medium 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from lexica.harvest.cli import build_parser, resolve_config
from lexica.harvest.config import HarvestConfig, WorkersConfig
from lexica.harvest.corpus import iter_documents, plan_shards
from lexica.harvest.pool import run_harvest
from lexica.store import ActivationStore

MANY_HOOKS = "resid_post.5,resid_post.10,resid_post.15,resid_post.20"


def plain_batches(tokenizer, documents: list[str], context: int, batch_tokens: int) -> tuple[list, int]:
    """BOS + (context - 1)-token windows, grouped by length into padded batches: (c)'s work."""
    windows = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), context - 1):
            windows.append([tokenizer.bos_token_id] + ids[start:start + context - 1])
    windows.sort(key=len, reverse=True)
    batches, current = [], []
    for window in windows:
        if current and (len(current) + 1) * len(current[0]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(window)
    batches.append(current)
    padded = [torch.tensor([w + [0] * (len(batch[0]) - len(w)) for w in batch]) for batch in batches]
    return padded, sum(len(w) - 1 for w in windows)


@torch.inference_mode()
def run_full(path: str, batches: list[torch.Tensor], layer: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    started = time.perf_counter()
    for input_ids in batches:
        states = model(input_ids, output_hidden_states=True).hidden_states
        states[layer + 1][:, 1:].half()
    return time.perf_counter() - started


@torch.inference_mode()
def run_truncated(path: str, batches: list[torch.Tensor], layer: int) -> float:
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    model.layers = model.layers[: layer + 1]
    started = time.perf_counter()
    for input_ids in batches:
        hidden = model(input_ids, use_cache=False).last_hidden_state  # its final norm: same cost class
        hidden[:, 1:].half()
    return time.perf_counter() - started


@dataclasses.dataclass
class Harvested:
    wall: float
    startup: float
    steady_seconds: float  # the shards' own seconds per actor
    tokens: int
    bytes_per_element: float
    write_wait: float  # share of the shards' seconds spent waiting on the writer


def run_lexica(config: HarvestConfig, run_url: str | None = None, documents: int | None = None,
               **changes) -> Harvested:
    """One harvest into a fresh run folder (a temporary one unless ``run_url``), measured."""
    folder = None if run_url else tempfile.mkdtemp(prefix="lexica-bench-")
    corpus = dataclasses.replace(config.corpus, max_documents=documents or config.corpus.max_documents)
    local = dataclasses.replace(config, run=run_url or folder, corpus=corpus, progress_seconds=1e9, **changes)
    try:
        started = time.perf_counter()
        summary = run_harvest(local)
        wall = time.perf_counter() - started
        commits = [c for url in summary.stores for c in ActivationStore(url, local.storage_options).commits()]
        actors = 1 if not local.workers.actors else local.workers.actors  # None: the default, 1 here
        total = sum({c.shard: c.seconds for c in commits}.values())  # every store's record of a shard agrees
        waited = sum(c.write_wait_seconds for c in commits)  # the harvest waits on each store's writer in turn
        return Harvested(wall, wall - total / actors, total / actors, summary.tokens, summary.bytes_per_element,
                         waited / max(total, 1e-9))
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def read_rate(url: str, repeats: int = 3) -> float:
    """Elements per CPU-second read into float32 tensors (best of ``repeats``; page cache warm)."""
    store = ActivationStore(url)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the page cache
        started = time.process_time()
        elements = 0
        for batch in store.iter_batches(batch_rows=16384):
            values = batch.activation.float()
            elements += values.numel()
        best = min(best, time.process_time() - started)
    return elements / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/demo.yaml")
    parser.add_argument("--documents", type=int, default=20, help="the long set: (c) on the pool")
    parser.add_argument("--medium", type=int, default=8, help="the medium set: (d), (e), S3")
    parser.add_argument("--short", type=int, default=4, help="the short set: (a), (b), in-process, v2")
    parser.add_argument("--skip", default="", help="comma list of variants to skip: c,d,e,s3,v2")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    config = resolve_config(build_parser().parse_args(["--config", args.config, "--hook", "resid_post.15"]))
    config = dataclasses.replace(config, workers=WorkersConfig())  # the defaults, sized to this machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "s3" not in skip:  # moto's fake credentials, set before Ray starts so its actors inherit them
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    threads = os.cpu_count() or 1  # what the default single actor gets here
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)

    def windows_of(documents: int, every: int = 1) -> tuple[list, int]:
        """The plain loops' batches over the first ``documents`` documents (every n-th batch: a
        sample of the same windows, for a long set)."""
        corpus = dataclasses.replace(config.corpus, max_documents=documents, docs_per_shard=None)
        texts = [text for _, text in iter_documents(plan_shards(corpus), corpus)]
        batches, _ = plain_batches(tokenizer, texts, config.context_length, config.batch_tokens)
        sample = batches[::every]
        return sample, sum(int((batch[:, 1:] != 0).sum()) for batch in sample)

    batches, tokens = windows_of(args.short)
    print(f"short set: {args.short} documents, {tokens:,} tokens; torch threads {threads}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rate: dict[str, float] = {}
    notes: dict[str, str] = {}
    rate["a full model"] = tokens / run_full(config.model.path, batches, 15)
    rate["b stop after block 15"] = tokens / run_truncated(config.model.path, batches, 15)
    # The pool variants run on other documents: their baselines are the plain loop on those windows.
    long_batches, long_tokens = windows_of(args.documents, every=4)
    rate["b stop after block 15, long set (1/4 of its batches)"] = long_tokens / run_truncated(
        config.model.path, long_batches, 15)
    medium_batches, medium_tokens = windows_of(args.medium)
    rate["b stop after block 20, medium set"] = medium_tokens / run_truncated(config.model.path, medium_batches, 20)
    print("plain loops done", flush=True)
    inline = run_lexica(config, documents=args.short, workers=WorkersConfig(actors=0))
    rate["c lexica in-process, 1 hook (steady)"] = inline.tokens / inline.steady_seconds
    if "c" not in skip:
        pooled = run_lexica(config, documents=args.documents)
        rate["c lexica pool, 1 hook (end to end)"] = pooled.tokens / pooled.wall
        rate["c lexica pool, 1 hook (steady)"] = pooled.tokens / pooled.steady_seconds
        notes["c"] = (f"(c) {pooled.tokens:,} tokens, start-up {pooled.startup:.1f} s = "
                      f"{pooled.startup / pooled.wall:.1%} of {pooled.wall:.0f} s end to end; "
                      f"writer wait {pooled.write_wait:.1%}")
        print(notes["c"], flush=True)
    if "d" not in skip:
        many = run_lexica(config, documents=args.medium, hook=MANY_HOOKS)
        rate["d lexica pool, 4 hooks (end to end)"] = many.tokens / many.wall
        rate["d lexica pool, 4 hooks (steady)"] = many.tokens / many.steady_seconds
        notes["d"] = f"(d) {many.tokens:,} tokens, start-up {many.startup:.1f} s, writer wait {many.write_wait:.1%}"
        print(notes["d"], flush=True)
        if "e" not in skip:
            separate = [run_lexica(config, documents=args.medium, hook=hook) for hook in MANY_HOOKS.split(",")]
            wall = sum(run.wall for run in separate)
            steady = sum(run.steady_seconds for run in separate)
            rate["e 4 separate harvests (end to end)"] = many.tokens / wall
            rate["e 4 separate harvests (steady)"] = many.tokens / steady
            notes["e"] = (f"(d) over (e): {wall / many.wall:.2f}x end to end, {steady / many.steady_seconds:.2f}x "
                          "steady")
            print(notes["e"], flush=True)
    if "s3" not in skip:
        from s3_local import start_moto

        server, options = start_moto()
        try:
            local = run_lexica(config, documents=args.medium)
            remote = run_lexica(dataclasses.replace(config, storage_options=options), run_url="s3://lexica-bench/run",
                                documents=args.medium)
            notes["s3"] = (f"(s3) moto S3 / local end to end {local.wall / remote.wall:.2f}, steady "
                           f"{local.steady_seconds / remote.steady_seconds:.2f}; writer wait: local "
                           f"{local.write_wait:.1%}, S3 {remote.write_wait:.1%} of the shards' time")
            print(notes["s3"], flush=True)
        finally:
            server.kill()
    if "v2" not in skip:
        folder = tempfile.mkdtemp(prefix="lexica-bench-v2-")
        try:
            sizes, reads = {}, {}
            for version in (1, 2):
                run = f"{folder}/v{version}"
                sizes[version] = run_lexica(config, run_url=run, documents=args.short, store_format=version,
                                            workers=WorkersConfig(actors=0)).bytes_per_element
                reads[version] = read_rate(f"{run}/activations/resid_post.15")
            notes["v2"] = (f"(v2) bytes per element v1 {sizes[1]:.4f}, v2 {sizes[2]:.4f} (target <= 1.75); read "
                           f"into float32 per CPU-second: v1 {reads[1] / 1e6:.0f}M, v2 {reads[2] / 1e6:.0f}M "
                           f"elements/s, v2/v1 {reads[2] / reads[1]:.2f} (target >= 0.9)")
            print(notes["v2"], flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    baselines = {"a ": "b stop after block 15", "b stop after block 15": "b stop after block 15",
                 "b stop after block 15, long": "b stop after block 15, long set (1/4 of its batches)",
                 "c lexica in-process": "b stop after block 15", "c lexica pool": "b stop after block 15, long set "
                 "(1/4 of its batches)", "b stop after block 20": "b stop after block 20, medium set",
                 "d ": "b stop after block 20, medium set", "e ": "b stop after block 20, medium set"}
    print("\n| variant | tokens/s | vs b (same depth, same documents) | vs a |\n|---|---:|---:|---:|")
    for name, value in rate.items():
        baseline = rate[baselines[max((key for key in baselines if name.startswith(key)), key=len)]]
        print(f"| {name} | {value:,.0f} | {value / baseline:.2f} | {value / rate['a full model']:.2f} |")
    print()
    for line in notes.values():
        print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
