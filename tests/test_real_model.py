"""The real demo model (SmolLM2-135M-Instruct) over real State of the Union text, through Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL = ASSETS / "models" / "smollm2-135m-instruct"
CORPUS = ASSETS / "corpora" / "sotu.jsonl"
CONTEXT = 128


@pytest.mark.slow
def test_smollm2_middle_layer_matches_output_hidden_states(ray_cluster, tmp_path):
    assert MODEL.is_dir() and CORPUS.is_file(), "demo assets missing: run `make assets` first"
    config = HarvestConfig(run=str(tmp_path / "run"), model=ModelConfig(path=str(MODEL)), hook="resid_post.middle",
                           corpus=CorpusConfig(paths=[str(CORPUS)], docs_per_shard=1, max_documents=2),
                           context_length=CONTEXT, batch_tokens=8 * CONTEXT,
                           workers=WorkersConfig(actors=1, cpus_per_actor=2)).validate()
    summary = run_harvest(config)
    store = ActivationStore(summary.store_url, expect={"hook": "resid_post.15", "d_model": 576})
    assert store.manifest["bos"] == {"prepend": True, "stored": False}
    assert 2.0 < summary.bytes_per_element <= 2.05

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    first_doc = next(store.iter_batches(batch_rows=10**6))
    text = CORPUS.read_text(encoding="utf-8").splitlines()[0]
    import json

    ids = tokenizer(json.loads(text)["text"], add_special_tokens=False)["input_ids"]
    assert first_doc.doc_id[0] == 0 and first_doc.token_id[: CONTEXT - 1].tolist() == ids[: CONTEXT - 1]
    for start in (0, CONTEXT - 1):  # the first window and the second one of the same address
        window = [tokenizer.bos_token_id] + ids[start:start + CONTEXT - 1]
        with torch.no_grad():
            expected = model(torch.tensor([window]), output_hidden_states=True).hidden_states[16][0, 1:]
        stored = first_doc.activation[start:start + len(window) - 1].float()
        torch.testing.assert_close(stored, expected, atol=2e-3 * expected.abs().max(), rtol=2e-3)
    # Dropping BOS keeps the position-0 attention-sink outlier (~100x norm) out of the store.
    norms = first_doc.activation.float().norm(dim=1)
    assert norms.max() < 20 * norms.median()
    assert store.statistics["mean_norm"] == pytest.approx(float(norms.mean()), rel=0.2)
