"""Harvest throughput against plain transformers loops over the same tokens, in one process run.

(a) full model: a plain loop running every block (AutoModelForCausalLM, output_hidden_states)
(b) truncated: a plain loop that stops after the hooked block and keeps fp16 copies in memory
(c) Lexica: ``run_harvest`` of the same documents into a local store, in-process (actors: 0)
    and through the Ray actor pool (actors: 1); for the pool, the steady-state rate is from the
    commit records' per-shard seconds (read → tokenise → forward → write → commit), and the
    end-to-end rate includes cluster start-up and model load.

Prints tokens/s for each, the ratios c/b and c/a, and bytes per stored activation element.
Usage: python bench/harvest.py [--documents 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from lexica.harvest.cli import build_parser, resolve_config
from lexica.harvest.corpus import iter_documents, plan_shards
from lexica.harvest.pool import run_harvest
from lexica.hooks import parse_hook
from lexica.store import ActivationStore


def plain_batches(tokenizer, documents: list[str], context: int, batch_tokens: int) -> list[torch.Tensor]:
    """BOS + 511-token windows, grouped by length into padded batches: the same work (c) does."""
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
    padded = []
    for batch in batches:
        width = len(batch[0])
        padded.append(torch.tensor([w + [0] * (width - len(w)) for w in batch]))
    return padded, sum(len(w) - 1 for w in windows)


@torch.inference_mode()
def run_full(path: str, batches: list[torch.Tensor], layer: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    started = time.perf_counter()
    kept = []
    for input_ids in batches:
        states = model(input_ids, output_hidden_states=True).hidden_states
        kept.append(states[layer + 1][:, 1:].half())
    return time.perf_counter() - started


@torch.inference_mode()
def run_truncated(path: str, batches: list[torch.Tensor], layer: int) -> float:
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    model.layers = model.layers[: layer + 1]
    started = time.perf_counter()
    kept = []
    for input_ids in batches:
        hidden = model(input_ids, use_cache=False).last_hidden_state  # norm applied: same cost class
        kept.append(hidden[:, 1:].half())
    return time.perf_counter() - started


def run_lexica(config, actors: int) -> tuple[float, float, float]:
    """(end-to-end seconds, summed per-shard seconds, bytes per element)."""
    run_dir = tempfile.mkdtemp(prefix="lexica-bench-")
    try:
        local = dataclasses.replace(config, run=run_dir, workers=dataclasses.replace(config.workers, actors=actors),
                                    progress_seconds=1e9)
        started = time.perf_counter()
        summary = run_harvest(local)
        wall = time.perf_counter() - started
        shard_seconds = sum(c.seconds for c in ActivationStore(summary.store_url).commits())
        return wall, shard_seconds, summary.bytes_per_element
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/demo.yaml")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    config = resolve_config(build_parser().parse_args(["--config", args.config,
                                                       "--max-documents", str(args.documents)]))
    threads = config.workers.torch_threads or max(1, int(config.workers.cpus_per_actor))
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = plan_shards(config.corpus)
    texts = [text for _, text in iter_documents(plan, config.corpus)]
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    layer = parse_hook(config.hook, AutoConfig.from_pretrained(config.model.path).num_hidden_layers).layer
    batches, tokens = plain_batches(tokenizer, texts, config.context_length, config.batch_tokens)
    print(f"{len(texts)} documents, {tokens:,} tokens, layer {layer}, torch threads {threads}")
    results: dict[str, list[float]] = {}
    bytes_per_element = 0.0
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every variant alike
        results.setdefault("a full model", []).append(tokens / run_full(config.model.path, batches, layer))
        results.setdefault("b stop at layer", []).append(tokens / run_truncated(config.model.path, batches, layer))
        wall, shards, bytes_per_element = run_lexica(config, actors=0)
        results.setdefault("c lexica in-process (end to end)", []).append(tokens / wall)
        results.setdefault("c lexica in-process (per-shard)", []).append(tokens / shards)
        wall, shards, _ = run_lexica(config, actors=1)
        results.setdefault("c lexica ray pool (end to end)", []).append(tokens / wall)
        results.setdefault("c lexica ray pool (per-shard)", []).append(tokens / shards)
    best = {name: max(values) for name, values in results.items()}
    print(f"\n{'variant':36s} {'tokens/s':>10s} {'vs b':>7s} {'vs a':>7s}")
    for name, rate in best.items():
        print(f"{name:36s} {rate:10.0f} {rate / best['b stop at layer']:7.2f} {rate / best['a full model']:7.2f}")
    print(f"\nbytes per stored activation element: {bytes_per_element:.4f} (fp16 target <= 2.05)")


if __name__ == "__main__":
    main()
