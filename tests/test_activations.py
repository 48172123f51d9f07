"""Stored activations equal an independent ``output_hidden_states`` computation, per architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, sample_texts, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.hooks import Capture, HookError, parse_hook
from lexica.models import ModelConfig, load_model
from lexica.store import ActivationStore

CONTEXT = 24


def independent_activations(folder, texts: list[str], layer: int, kind: str) -> dict[tuple[int, int], torch.Tensor]:
    """(doc_id, position) → activation, from a full forward with output_hidden_states."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = {}
    for doc_id, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), CONTEXT - 1):  # one slot per window goes to BOS
            window = [tokenizer.bos_token_id] + ids[start:start + CONTEXT - 1]
            with torch.no_grad():
                states = model(torch.tensor([window]), output_hidden_states=True).hidden_states
            # hidden_states[i] is the input of block i; the last entry has the final norm applied,
            # so tests hook middle blocks only.
            vectors = states[layer + 1][0] if kind == "resid_post" else states[layer][0]
            for offset in range(1, len(window)):
                expected[(doc_id, start + offset - 1)] = vectors[offset]
    return expected


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("kind", ["resid_post", "resid_pre"])
def test_store_matches_output_hidden_states(tiny_models, tmp_path, architecture, kind):
    texts = sample_texts(12, seed=1) + ["word " * 150]  # the last one spans several windows
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    config = HarvestConfig(run=str(tmp_path / "run"), model=ModelConfig(path=str(tiny_models[architecture])),
                           hook=f"{kind}.2", corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=5),
                           context_length=CONTEXT, batch_tokens=4 * CONTEXT,
                           workers=WorkersConfig(actors=0)).validate()
    summary = run_harvest(config)
    store = ActivationStore(summary.store_url)
    expected = independent_activations(tiny_models[architecture], texts, 2, kind)
    seen = 0
    for batch in store.iter_batches(batch_rows=97):
        for row in range(len(batch.doc_id)):
            key = (int(batch.doc_id[row]), int(batch.position[row]))
            want = expected.pop(key)
            got = batch.activation[row].float()
            scale = want.abs().max()
            torch.testing.assert_close(got, want, atol=2e-3 * scale, rtol=2e-3)
            seen += 1
    assert not expected, f"{len(expected)} tokens were never stored, e.g. {list(expected)[:3]}"
    assert seen == store.num_rows > 150


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sublayer_outputs_add_up_to_the_residual_update(tiny_models, architecture):
    loaded = load_model(ModelConfig(path=str(tiny_models[architecture])))
    input_ids = torch.randint(3, 300, (2, 16))
    captured = {kind: Capture(loaded.model, parse_hook(f"{kind}.1", 4))(input_ids=input_ids)
                for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out")}
    update = captured["resid_post"] - captured["resid_pre"]
    torch.testing.assert_close(update, captured["attn_out"] + captured["mlp_out"], atol=1e-4, rtol=1e-4)


def test_hook_parsing_names_the_valid_range():
    assert parse_hook("resid_post.middle", 30).layer == 15
    assert parse_hook("mlp_out.-1", 30).layer == 29
    with pytest.raises(HookError, match=r"valid layers are 0\.\.29"):
        parse_hook("resid_post.30", 30)
    with pytest.raises(HookError, match="unknown hook point"):
        parse_hook("residual.3", 30)


def test_bfloat16_model_and_store(tiny_models, tmp_path):
    """bf16 end to end (the GPU default): stored bytes decode as bf16 and track the fp32 values."""
    texts = sample_texts(4, seed=4)
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    config = HarvestConfig(run=str(tmp_path / "run"), model=ModelConfig(path=str(tiny_models["llama"]),
                                                                          dtype="bfloat16"),
                           hook="resid_post.1", corpus=CorpusConfig(paths=[str(corpus)]), context_length=CONTEXT,
                           batch_tokens=4 * CONTEXT, store_dtype="bfloat16", workers=WorkersConfig(actors=0))
    store = ActivationStore(run_harvest(config.validate()).store_url, expect={"dtype": "bfloat16"})
    batch = next(store.iter_batches(batch_rows=10**6))
    assert batch.activation.dtype == torch.bfloat16
    expected = independent_activations(tiny_models["llama"], texts, 1, "resid_post")
    want = torch.stack([expected[(int(d), int(p))] for d, p in zip(batch.doc_id, batch.position, strict=True)])
    relative_error = (batch.activation.float() - want).norm(dim=1) / want.norm(dim=1)
    assert relative_error.median() < 0.02  # bf16 has 8 mantissa bits; errors compound over 2 blocks
