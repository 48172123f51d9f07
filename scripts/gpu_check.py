"""The GPU check: Lexica's in-process harvest on one accelerator, against a plain forward loop.

Runs where only PyTorch, transformers, tokenizers, pyarrow and safetensors are installed (no Ray,
no datasets, no network): models are built from `transformers` configs with random weights (the
throughput of a forward pass does not depend on the weights), the tokenizer is trained on the
spot and the corpus is generated. For each model it prints, as a markdown table: the harvest's
tokens/s (bf16 model, fp16 store, several hooks in one pass, `actors: 0`), a plain loop that
stops after the deepest hook on the same windows, the ratio, and the harvest's share of the
forward's FLOP ceiling (2 x parameters up to the deepest hook + attention, per token, against a
bf16 matmul measured on the same device).

    python scripts/gpu_check.py                 # on a GPU machine, about 3 minutes
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


if __name__ == "__main__":
    main()
