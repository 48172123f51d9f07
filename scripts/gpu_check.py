"""The GPU check: Lexica's in-process harvest and training step on one accelerator.

Runs where only PyTorch, transformers, tokenizers, pyarrow and safetensors are installed (no Ray,
no datasets, no network): models are built from `transformers` configs with random weights (the
throughput of a forward pass does not depend on the weights), the tokenizer is trained on the
spot and the corpus is generated. For each model it prints, as a markdown table: the harvest's
tokens/s (bf16 model, fp16 store, several hooks in one pass, `actors: 0`), a plain loop that
stops after the deepest hook on the same windows, the ratio, and the harvest's share of the
forward's FLOP ceiling (2 x parameters up to the deepest hook + attention, per token, against a
bf16 matmul measured on the same device). A second table: TopK training (Lexica's own step and
fused Adam) at several widths in fp32 and bf16-mixed (``train.precision``), vectors/s and the share
of the encoder matmul's own rate in the same precision ([batch, d_model] x [d_model, latents]).

    python scripts/gpu_check.py                 # on a GPU machine, about 4 minutes
    python scripts/gpu_check.py --quick --device cpu   # a smoke run anywhere (the tests run it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a bare checkout, without installing

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig  # noqa: E402
from lexica.harvest.pool import run_harvest  # noqa: E402
from lexica.models import ModelConfig  # noqa: E402
from lexica.store import ActivationStore  # noqa: E402

WORDS = ("the model reads every token of a long document and its layers write features into the residual "
         "stream where a sparse dictionary can find them again cities rivers proteins theorems").split()
# name → (hidden, layers, heads, kv heads, intermediate, hooks): the demo's SmolLM2-135M shape and a
# 1B-class Llama shape.
SHAPES = {"smollm2-135m": (576, 30, 9, 3, 1536, "resid_post.5,resid_post.10,resid_post.15,mlp_out.15"),
          "llama-1b": (2048, 16, 32, 8, 8192, "resid_post.3,resid_post.7,mlp_in.11,mlp_out.11")}
QUICK = {"tiny": (64, 4, 4, 2, 128, "resid_post.1,mlp_in.2,mlp_out.2")}
# (d_model, latents) of the training table: the demo's width at 2^14 and 2^20 latents, a 1B model's.
TRAIN_SHAPES = [(576, 2**14), (576, 2**20), (2048, 2**14), (2048, 2**18)]
QUICK_TRAIN = [(64, 1024)]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(WORDS)] * 8, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_model(folder: Path, shape: tuple) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, heads, kv_heads, intermediate, _ = shape
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=49152,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.model.layers[0].parameters())


def write_corpus(path: Path, documents: int, words: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


@torch.inference_mode()
def plain_rate(model_folder: Path, device: str, context: int, batch_tokens: int, tokens_wanted: int,
               deepest: int) -> float:
    """A plain loop stopped after block ``deepest`` on random windows of the same length."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_folder, dtype=torch.bfloat16).to(device).eval()
    model.layers = model.layers[: deepest + 1]
    rows = max(1, batch_tokens // context)
    batches = max(2, tokens_wanted // (rows * context))
    input_ids = torch.randint(3, 500, (rows, context), device=device)
    model(input_ids[:, :16], use_cache=False)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        model(input_ids, use_cache=False).last_hidden_state[:, 1:].to(torch.float16).cpu()
    synchronize(device)
    return batches * rows * (context - 1) / (time.perf_counter() - started)


def matmul_ceiling(device: str) -> float:
    """FLOP/s of a large bf16 (CUDA) or fp32 (CPU) matmul on ``device``."""
    dtype, size = (torch.bfloat16, 8192) if device.startswith("cuda") else (torch.float32, 1024)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def encoder_seconds(device: str, batch: int, d_model: int, latents: int, dtype: torch.dtype) -> float:
    """Best time of the encoder matmul alone, [batch, d_model] x [d_model, latents], in ``dtype``."""
    x = torch.randn(batch, d_model, device=device, dtype=dtype)
    weight = torch.randn(d_model, latents, device=device, dtype=dtype)
    x @ weight
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        x @ weight
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def training_row(device: str, d_model: int, latents: int, precision: str, batch: int, steps: int) -> str:
    """One TopK (k 32) training configuration: vectors/s and share of its encoder matmul's rate."""
    from lexica.train.architectures import build
    from lexica.train.optimizers import new_optimizer
    from lexica.train.step import train_step

    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    torch.manual_seed(0)
    dictionary = build("topk", d_in=d_model, d_sae=latents, k=32, seed=0).to(device)
    dictionary.compute_dtype = dtype
    # On a GPU the dense pre-activations of a whole batch fit: one chunk up to 8 GiB.
    dictionary.encoder_budget = (8 << 30) if device.startswith("cuda") else (1 << 30)
    data = [torch.randn(batch, d_model, device=device) + 0.5 for _ in range(4)]
    dictionary.initialise_from(data[0])
    optimizer = new_optimizer(dictionary, 1e-4)
    for step in range(2):  # warm-up: allocations, kernels, autotuning
        train_step(dictionary, optimizer, data[step], None, variance=1.0)
    synchronize(device)
    started = time.perf_counter()
    for step in range(steps):
        output = train_step(dictionary, optimizer, data[step % len(data)], None, variance=1.0)
    synchronize(device)
    rate = steps * batch / (time.perf_counter() - started)
    ceiling = batch / encoder_seconds(device, batch, d_model, latents, dtype)
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.startswith("cuda") else "-"
    return (f"| topk | {d_model} | {latents:,} | {precision} | {batch:,} | {rate:,.0f} | {ceiling:,.0f} | "
            f"{rate / ceiling:.0%} | {float(output.terms['fvu']):.3f} | {memory} |")


def relative(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((mine.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def parity_rows(folder: Path, device: str) -> list[str]:
    """The tiny model on ``device`` against the CPU, each path Lexica runs there: harvest (bf16
    model, fp16 store), one TopK step, the statistics pass, one steered generation (fp32 model,
    greedy). Each row: what is compared and the difference."""
    import copy

    from lexica.analysis.config import AnalysisConfig
    from lexica.analysis.stats import parts_to_read, statistics_of_parts
    from lexica.analysis.steering import steer
    from lexica.models import load_causal_lm
    from lexica.train.architectures import build
    from lexica.train.optimizers import new_optimizer
    from lexica.train.step import train_step

    model_folder = folder / "model"
    tokenizer = build_tokenizer(model_folder)
    build_model(model_folder, QUICK["tiny"])
    write_corpus(folder / "corpus.jsonl", 12, 200)
    stores = {}  # by device (a CPU-only check compares the CPU with itself)
    for index, where in enumerate(("cpu", device)):
        config = HarvestConfig(run=str(folder / f"run-{index}"), hook="resid_post.1",
                               context_length=64, batch_tokens=1024, store_dtype="float16",
                               model=ModelConfig(path=str(model_folder), dtype="bfloat16", device=where),
                               corpus=CorpusConfig(paths=[str(folder / "corpus.jsonl")]),
                               workers=WorkersConfig(actors=0)).validate()
        stores[where] = ActivationStore(run_harvest(config).store_url)
    rows = [next(stores[where].iter_batches(4096)).activation.float() for where in ("cpu", device)]
    lines = [f"| harvest resid_post.1 (bf16 model, fp16 store), {len(rows[0]):,} rows | activations | "
             f"{relative(rows[1], rows[0]):.1e} |"]
    torch.manual_seed(0)
    reference = build("topk", d_in=rows[0].shape[1], d_sae=256, k=8, seed=0)
    reference.initialise_from(rows[0])
    stepped = {}
    for where in ("cpu", device):
        dictionary = copy.deepcopy(reference).to(where)
        optimizer = new_optimizer(dictionary, 1e-3)
        output = train_step(dictionary, optimizer, rows[0].to(where), None, variance=float(rows[0].var(0).sum()))
        stepped[where] = (float(output.loss.detach()), dictionary.W_enc.detach().cpu(), dictionary)
    lines.append(f"| one TopK step (256 latents, fp32) | loss; W_enc after the step | "
                 f"{abs(stepped[device][0] - stepped['cpu'][0]) / abs(stepped['cpu'][0]):.1e}; "
                 f"{relative(stepped[device][1], stepped['cpu'][1]):.1e} |")
    statistics = {}
    for where in ("cpu", device):
        settings = AnalysisConfig(device=where, top_examples=5, samples=8)
        statistics[where] = statistics_of_parts(stores["cpu"], copy.deepcopy(reference), parts_to_read(
            stores["cpu"], None), settings).result()
    agree = float((statistics[device].fires == statistics["cpu"].fires).mean())
    maxima = [torch.tensor(statistics[where].max_activation) for where in (device, "cpu")]
    lines.append(f"| statistics pass, {int(statistics['cpu'].fires.sum()) // 8:,} tokens | features with equal fire "
                 f"counts; max activations | {agree:.1%}; {relative(*maxima):.1e} |")
    generated = {}
    for where in ("cpu", device):
        model = load_causal_lm(ModelConfig(path=str(model_folder), dtype="float32", device=where))
        result = steer(model, tokenizer, copy.deepcopy(reference), "resid_post.1", {0: 8.0},
                       "the model reads every token", max_new_tokens=16)
        generated[where] = result.steered_ids
    lines.append(f"| steered generation (feature 0 at 8, 16 greedy tokens, fp32 model) | tokens equal | "
                 f"{sum(a == b for a, b in zip(generated[device], generated['cpu'], strict=False))}/"
                 f"{len(generated['cpu'])} |")
    return lines


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus (a smoke run)")
    args = parser.parse_args()
    shapes = QUICK if args.quick else SHAPES
    context, batch_tokens = (64, 1024) if args.quick else (1024, 65536)
    documents, words = (12, 200) if args.quick else (400, 4000)
    ceiling = matmul_ceiling(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}; matmul ceiling {ceiling / 1e12:.1f} TFLOP/s; torch {torch.__version__}", flush=True)
    print("\n| model | hooks | tokens | harvest tok/s (steady) | plain loop tok/s | ratio | share of FLOP ceiling |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, shape in shapes.items():
        folder = Path(tempfile.mkdtemp(prefix="lexica-gpu-"))
        try:
            build_tokenizer(folder / "model")
            block_parameters = build_model(folder / "model", shape)
            write_corpus(folder / "corpus.jsonl", documents, words)
            hooks = shape[5]
            config = HarvestConfig(run=str(folder / "run"), hook=hooks, context_length=context,
                                   model=ModelConfig(path=str(folder / "model"), dtype="bfloat16", device=args.device),
                                   corpus=CorpusConfig(paths=[str(folder / "corpus.jsonl")]),
                                   batch_tokens=batch_tokens, store_dtype="float16", progress_seconds=30.0,
                                   workers=WorkersConfig(actors=0)).validate()
            warm = dataclasses.replace(config, run=str(folder / "warm"),
                                       corpus=dataclasses.replace(config.corpus, max_documents=2))
            run_harvest(warm)  # CUDA context, kernels and allocator warmed up
            summary = run_harvest(config)
            commits = ActivationStore(summary.store_url).commits()
            steady = summary.tokens / sum(commit.seconds for commit in commits)  # model load excluded
            deepest = max(int(hook.rsplit(".", 1)[1]) for hook in hooks.split(","))
            plain = plain_rate(folder / "model", args.device, context, batch_tokens, summary.tokens, deepest)
            hidden = shape[0]
            flops_per_token = (deepest + 1) * (2 * block_parameters + 4 * hidden * context / 2)
            share = steady * flops_per_token / ceiling
            print(f"| {label} | {len(hooks.split(','))} (to block {deepest}) | {summary.tokens:,} | "
                  f"{steady:,.0f} ({summary.tokens_per_second:,.0f} end to end) | {plain:,.0f} | "
                  f"{steady / plain:.2f} | {share:.1%} |", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n| {args.device} against the CPU, tiny model | compared | difference |\n|---|---|---|")
    folder = Path(tempfile.mkdtemp(prefix="lexica-parity-"))
    try:
        for line in parity_rows(folder, args.device):
            print(line, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    batch, steps = (256, 3) if args.quick else (4096, 10)
    print("\n| architecture | d_model | latents | precision | batch | vectors/s | encoder matmul alone, vectors/s | "
          "share | batch FVU | peak GPU memory (GiB) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for d_model, latents in QUICK_TRAIN if args.quick else TRAIN_SHAPES:
        for precision in ("fp32", "bf16-mixed"):
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                print(training_row(args.device, d_model, latents, precision, batch, steps), flush=True)
            except torch.OutOfMemoryError:
                print(f"| topk | {d_model} | {latents:,} | {precision} | {batch:,} | out of memory | | | | |",
                      flush=True)


if __name__ == "__main__":
    main()
