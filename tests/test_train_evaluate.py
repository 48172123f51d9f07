"""The held-out evaluation: a perfect dictionary changes nothing, a zero one equals ablation, and
a trained one lands in between; the whole train stage runs on a harvested store."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import sample_texts, write_jsonl
from transformers import AutoModelForCausalLM

from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.store import ActivationStore
from lexica.train.architectures import build
from lexica.train.config import TrainConfig
from lexica.train.evaluate import evaluate_dictionaries, evaluate_dictionary
from lexica.train.fit import fit

CONTEXT, D_MODEL = 32, 64


def trained_tiny_model(source, folder, texts: list[str]):
    """The random tiny model, briefly trained on the texts: a random model predicts nothing, so
    splicing or deleting a layer would change nothing measurable."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = [torch.tensor([tokenizer.bos_token_id] + tokenizer(text)["input_ids"][:CONTEXT - 1]) for text in texts]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        batch = torch.nn.utils.rnn.pad_sequence([ids[i] for i in torch.randperm(len(ids))[:16]], batch_first=True,
                                                padding_value=tokenizer.pad_token_id)
        loss = model(input_ids=batch, labels=batch.masked_fill(batch == tokenizer.pad_token_id, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def harvest_trained_tiny_model(tiny_models, folder, hook: str):
    """Stores of ``hook`` over the first 30 of 40 documents (the last 10 are held out), from the
    tiny model briefly trained on them; returns the harvest's summary."""
    texts = sample_texts(40, seed=7)
    corpus = write_jsonl(folder / "docs.jsonl", texts)
    model = trained_tiny_model(tiny_models["llama"], folder / "model", texts)
    config = HarvestConfig(run=str(folder / "run"), model=ModelConfig(path=str(model)), hook=hook,
                           corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=10, max_documents=30),
                           context_length=CONTEXT, batch_tokens=8 * CONTEXT, workers=WorkersConfig(actors=0))
    return run_harvest(config.validate())


@pytest.fixture(scope="module")
def harvested(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    summary = harvest_trained_tiny_model(tiny_models, folder, "resid_post.2")
    return folder / "run", ActivationStore(summary.store_url)


def identity_dictionary() -> torch.nn.Module:
    """ReLU latents for +x and −x: relu(x) − relu(−x) = x, an exact reconstruction."""
    dictionary = build("relu", d_in=D_MODEL, d_sae=2 * D_MODEL)
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        dictionary.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        dictionary.b_enc.zero_()
        dictionary.b_dec.zero_()
    return dictionary.eval()


def test_a_perfect_dictionary_recovers_everything_and_a_zero_one_nothing(tiny_models, harvested):
    _, store = harvested
    perfect = evaluate_dictionary(identity_dictionary(), store.manifest, tokens=300, device="cpu")
    assert perfect["doc_ids"][0] >= 30  # held-out documents only
    assert perfect["tokens"] >= 200
    assert perfect["ce_zero"] > perfect["ce_clean"] + 0.05  # the layer matters to this model
    assert perfect["delta_ce"] == pytest.approx(0, abs=1e-5)
    assert perfect["ce_recovered"] == pytest.approx(1, abs=1e-4)
    assert perfect["kl"] == pytest.approx(0, abs=1e-6) and perfect["fvu"] < 1e-10

    assert 0 < perfect["ce_clean"] < float(torch.log(torch.tensor(400.0)))  # better than uniform: trained

    zero = identity_dictionary()
    with torch.no_grad():
        zero.W_dec.zero_()
    ablated = evaluate_dictionary(zero, store.manifest, tokens=300, device="cpu")
    assert ablated["ce_spliced"] == pytest.approx(ablated["ce_zero"], abs=1e-5)
    assert ablated["ce_recovered"] == pytest.approx(0, abs=1e-4)
    assert ablated["kl"] > 0.01 and ablated["fvu"] >= 1  # b_dec = 0: the mean is missed too

    # A sweep's dictionaries are evaluated together (one clean and one ablated run for all of
    # them): each gets exactly what it gets alone.
    together = evaluate_dictionaries([identity_dictionary(), zero], store.manifest, tokens=300, device="cpu")
    assert together == [perfect, ablated]


def test_training_on_a_harvested_store_reports_evaluation_density_and_plot(harvested, tmp_path, monkeypatch):
    run, store = harvested
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking = f"file://{tmp_path / 'mlruns'}"
    summary = fit(TrainConfig(run=str(run), store=store.url, architecture="topk", width="4x", k=8, batch_size=256,
                              tokens=40 * 256, lr=3e-3, workers=0, buffer_rows=2048, log_every=10, eval_tokens=300,
                              trackers=["mlflow"], tracking_uri=tracking))
    evaluation = summary["evaluation"]
    # The evaluation lands in the same MLflow run as the training curves.
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking)
    (tracked,) = client.search_runs([client.get_experiment_by_name("lexica").experiment_id])
    assert tracked.data.metrics["eval/ce_recovered"] == pytest.approx(evaluation["ce_recovered"])
    assert tracked.data.metrics["fvu"] == pytest.approx(summary["final"]["fvu"])
    assert evaluation["ce_clean"] < evaluation["ce_spliced"] < evaluation["ce_zero"]
    assert 0 < evaluation["ce_recovered"] < 1 and evaluation["kl"] > 0 and evaluation["l0"] <= 8
    folder = run / "dictionaries" / summary["name"]
    assert json.loads((folder / "evaluation.json").read_text()) == evaluation
    density = json.loads((folder / "feature_density.json").read_text())
    assert len(density) == 4 * D_MODEL and abs(sum(density) - evaluation_l0(store, summary)) < 1e-6
    assert (folder / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def evaluation_l0(store: ActivationStore, summary: dict) -> float:
    """Mean active latents per token over the store sample: the densities' sum, independently."""
    from lexica.train.export import load_dictionary

    exported = load_dictionary(summary["folder"] + "/final")
    vectors = torch.cat([batch.activation.float() for batch in store.iter_batches(batch_rows=4096)])[:65536]
    return float((exported.encode(vectors).values > 0).sum()) / len(vectors)
