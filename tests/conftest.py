"""Shared test fixtures: tiny real models built offline, corpora, a local Ray, a moto S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Fake credentials for the moto server, set before any Ray worker starts so actors inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find features in the activations of language models.",
    "Ask not what your country can do for you; ask what you can do for your country.",
    "def harvest(model, layer):\n    return activations  # Python code with symbols {}[]()<>",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Ça va? Ñandú 日本語 テキスト",
]
ARCHITECTURES = ("llama", "gpt2", "gpt_neox")


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_model(architecture: str, folder: Path, vocab_size: int, layers: int = 4, d_model: int = 64) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if architecture == "llama":
        config = LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=d_model, n_layer=layers, n_head=4, n_positions=512, **common)
    elif architecture == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=512, **common)
    else:
        raise ValueError(architecture)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves the residual stream tiny; scale up so fp16 rounding is meaningful.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0) if parameter.dim() > 1 else None
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for architecture in ARCHITECTURES:
        folder = root / architecture
        tokenizer = build_tokenizer(folder)
        build_model(architecture, folder, len(tokenizer))
        folders[architecture] = folder
    return folders


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({field: text, "id": len(text) if isinstance(text, str) else 0}) + "\n")
    return path


def sample_texts(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = " ".join(TRAINING_TEXT).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) for _ in range(count)]


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", sample_texts(40))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: starting one costs ~10 s here."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields (endpoint_url, storage_options)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("lexica-test")
    yield endpoint, {"endpoint_url": endpoint}
    server.stop()


# ---------------------------------------------------------------- headless Chromium (the browser tests)

def find_chromium() -> str | None:
    return os.environ.get("LEXICA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    required = os.environ.get("LEXICA_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("LEXICA_REQUIRE_BROWSER=1 but the playwright package is missing (make browser)")
        pytest.skip("playwright is not installed; `make browser` sets up the browser tests")
    if chromium is None:
        if required:
            pytest.fail("LEXICA_REQUIRE_BROWSER=1 but no Chromium was found (set LEXICA_CHROMIUM or run make browser)")
        pytest.skip("no Chromium found (set LEXICA_CHROMIUM or run `make browser`)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A page plus what it must not do: open dialogs or throw script errors."""

    def __init__(self, page):
        self.page, self.dialogs, self.errors = page, [], []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, url: str, wait_ready: bool = True) -> None:
        self.page.goto(url)
        if wait_ready:
            self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)

    def assert_inert(self) -> None:
        assert self.page.evaluate("typeof window.__pwned") == "undefined"
        assert self.dialogs == []
        assert self.errors == []


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    watched = Watched(context.new_page())
    yield watched
    watched.assert_inert()
    context.close()
