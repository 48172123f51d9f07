"""Transcoders: a dictionary that reads one hook point and reconstructs another. It recovers a known
sparse map; the skip path learns a linear part; the export takes raw activations and names both
hooks; the evaluation splices it in place of the MLP; mismatched stores are refused."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_train_evaluate import harvest_trained_tiny_model
from test_train_topk import mean_max_cosine

import lexica
from lexica.analysis.site_data import read_data_file
from lexica.analysis.steering import clamped_logits
from lexica.cli import main
from lexica.errors import ConfigError
from lexica.hooks import Capture, hook_module, parse_hook
from lexica.models import config_from_manifest, load_causal_lm
from lexica.run import store_url
from lexica.store import ActivationStore, StoreError, write_store
from lexica.train.architectures import SparseCode
from lexica.train.config import TrainConfig
from lexica.train.evaluate import evaluate_dictionary
from lexica.train.export import load_dictionary
from lexica.train.fit import fit

D_IN, D_OUT, LATENTS, ACTIVE = 96, 64, 256, 4


def paired_synthetic(count: int, seed: int = 0, linear: float = 0.0):
    """Inputs and targets written by the same sparse codes through two different dictionaries
    (plus, with ``linear``, a dense linear map of the input: what a skip path can learn)."""
    generator = torch.Generator().manual_seed(seed)
    reads = torch.nn.functional.normalize(torch.randn(LATENTS, D_IN, generator=generator), dim=1)
    writes = torch.nn.functional.normalize(torch.randn(LATENTS, D_OUT, generator=generator), dim=1)
    chosen = torch.randint(0, LATENTS, (count, ACTIVE), generator=generator)
    codes = torch.zeros(count, LATENTS).scatter_(1, chosen, torch.rand(count, ACTIVE, generator=generator) + 0.5)
    inputs = codes @ reads
    targets = codes @ writes + linear * inputs @ torch.randn(D_IN, D_OUT, generator=generator) / D_IN**0.5
    return inputs * 10, targets * 3, writes


def write_pair(run: str, inputs, targets, shards: int = 2) -> None:
    for hook, values in (("mlp_in.0", inputs), ("mlp_out.0", targets)):
        write_store(store_url(run, hook), values, hook, shards=shards, tokens_per_document=16,
                    model={"id": "synthetic"})


def config_for(run, **knobs) -> TrainConfig:
    values = dict(eval_tokens=0, run=str(run), hook="mlp_in.0", target="mlp_out.0", width="512", k=8,
                  batch_size=512, buffer_rows=8192, lr=4e-3, workers=0, log_every=20)
    return TrainConfig(**{**values, **knobs})


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka", "relu", "jumprelu"])
def test_a_transcoder_recovers_a_known_sparse_map(tmp_path, architecture):
    inputs, targets, writes = paired_synthetic(24_000)
    write_pair(str(tmp_path / "run"), inputs, targets)
    extra = {"matryoshka": {"prefixes": [128]}, "relu": {"l1_coefficient": 1.0},
             "jumprelu": {"l0_coefficient": 0.2}}.get(architecture, {})
    summary = fit(config_for(tmp_path / "run", architecture=architecture, extra=extra,
                             tokens=360_000 if "relu" in architecture else 160_000,
                             lr=2e-3 if "relu" in architecture else 4e-3))
    assert summary["name"] == f"{architecture}-mlp_in.0-to-mlp_out.0-512-k8"
    dictionary = summary["dictionary"]
    assert dictionary.W_dec.shape == (512, D_OUT) and dictionary.W_enc.shape == (D_IN, 512)
    assert mean_max_cosine(writes, dictionary.W_dec.detach()) > 0.9
    assert summary["final"]["fvu"] < 0.15
    # The export takes raw activations and writes raw targets.
    exported = load_dictionary(str(tmp_path / "run" / "dictionaries" / summary["name"] / "final"))
    output = exported.reconstruct(inputs[:2000])
    fvu = float((output - targets[:2000]).pow(2).sum() / (targets[:2000] - targets[:2000].mean(0)).pow(2).sum())
    assert fvu < 0.2


def test_the_skip_path_learns_the_linear_part(tmp_path):
    inputs, targets, _ = paired_synthetic(24_000, linear=3.0)
    write_pair(str(tmp_path / "run"), inputs, targets)
    plain = fit(config_for(tmp_path / "run", tokens=120_000))
    skip = fit(config_for(tmp_path / "run", tokens=120_000, skip=True))
    assert skip["name"].endswith("-to-mlp_out.0-skip-512-k8")
    assert skip["final"]["fvu"] < 0.6 * plain["final"]["fvu"]
    folder = tmp_path / "run" / "dictionaries" / skip["name"] / "final"
    config = json.loads((folder / "cfg.json").read_text())
    assert config["architecture"] == "topk_skip_transcoder" and config["d_out"] == D_OUT
    assert config["apply_b_dec_to_input"] is False
    assert config["metadata"]["hook_name"] == "blocks.0.ln2.hook_normalized"
    assert config["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    exported = load_dictionary(str(folder))
    assert exported.W_skip.shape == (D_OUT, D_IN)
    # Folding: the export on raw inputs is the trained dictionary on normalised ones, rescaled.
    trained = skip["dictionary"]
    scale, target_scale = (json.loads((folder / "cfg.json").read_text())["metadata"][key]
                           for key in ("lexica_normalisation_scale_folded", "lexica_target_scale_folded"))
    with torch.no_grad():
        torch.testing.assert_close(exported.reconstruct(inputs[:64]),
                                   trained.reconstruct(inputs[:64] * scale) / target_scale, rtol=1e-4, atol=1e-4)


def test_mismatched_stores_and_bad_pairs_are_refused(tmp_path):
    inputs, targets, _ = paired_synthetic(4_000)
    run = str(tmp_path / "run")
    write_pair(run, inputs, targets)
    write_store(store_url(run, "mlp_out.1"), targets, "mlp_out.1", shards=3, tokens_per_document=16,
                model={"id": "synthetic"})
    with pytest.raises(StoreError, match="hold different parts"):
        fit(config_for(run, target="mlp_out.1"))
    with pytest.raises(ConfigError, match="does not come after"):
        fit(config_for(run, hook="mlp_out.0", target="mlp_in.0"))
    with pytest.raises(ConfigError, match="skip: true makes a skip-transcoder"):
        fit(config_for(run, target=None, skip=True))


@pytest.fixture(scope="module")
def harvested_pair(tiny_models, tmp_path_factory):
    """mlp_in.2 and mlp_out.2 of a briefly trained tiny model, from one harvest (30 of 40 documents)."""
    folder = tmp_path_factory.mktemp("transcoder")
    harvest_trained_tiny_model(tiny_models, folder, "mlp_in.2,mlp_out.2")
    return folder / "run"


class MLPAsTranscoder(torch.nn.Module):
    """A "transcoder" that is the model's own MLP (times ``factor``): spliced in at factor 1 it
    must change nothing, at factor 2 it must change the predictions."""

    def __init__(self, mlp, factor: float = 1.0):
        super().__init__()
        self.mlp, self.factor = mlp, factor

    def encode(self, x):
        return SparseCode(x[:, :1].abs(), torch.zeros(len(x), 1, dtype=torch.long))

    def reconstruct(self, x):
        return self.factor * self.mlp(x)


@pytest.fixture(scope="module")
def trained_transcoder(harvested_pair):
    return fit(TrainConfig(run=str(harvested_pair), hook="mlp_in.2", target="mlp_out.2", width="4x", k=8,
                           batch_size=256, buffer_rows=2048, tokens=30_000, workers=0, eval_tokens=512, skip=True,
                           architecture="batchtopk"))


def test_evaluation_splices_the_transcoder_in_place_of_the_mlp(harvested_pair, trained_transcoder):
    store = ActivationStore(str(harvested_pair / "activations" / "mlp_in.2"))
    model = load_causal_lm(config_from_manifest(store.manifest, device="cpu", dtype="float32"))
    mlp = hook_module(model, parse_hook("mlp_out.2", model.config.num_hidden_layers))
    perfect = evaluate_dictionary(MLPAsTranscoder(mlp), store.manifest, tokens=512, device="cpu",
                                  target_hook="mlp_out.2")
    assert perfect["delta_ce"] == pytest.approx(0, abs=1e-4) and perfect["kl"] == pytest.approx(0, abs=1e-5)
    assert perfect["fvu"] == pytest.approx(0, abs=1e-6)
    doubled = evaluate_dictionary(MLPAsTranscoder(mlp, 2.0), store.manifest, tokens=512, device="cpu",
                                  target_hook="mlp_out.2")
    assert doubled["kl"] > 1e-3 and doubled["fvu"] > 0.1  # the splice really stands in for the MLP
    evaluation = trained_transcoder["evaluation"]
    assert 0 < evaluation["fvu"] < 1 and evaluation["kl"] > 0 and "ce_recovered" in evaluation
    cfg = json.loads((harvested_pair / "dictionaries" / trained_transcoder["name"] / "final" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"


def test_steering_a_transcoder_feature_moves_the_mlp_output_along_its_decoder(harvested_pair, trained_transcoder):
    dictionary = lexica.Run(str(harvested_pair)).dictionary(trained_transcoder["name"])
    assert (dictionary.hook, dictionary.target_hook) == ("mlp_in.2", "mlp_out.2")
    store = ActivationStore(str(harvested_pair / "activations" / "mlp_in.2"))
    model = load_causal_lm(config_from_manifest(store.manifest, device="cpu", dtype="float32"))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    inputs = Capture(model, parse_hook("mlp_in.2", model.config.num_hidden_layers))(input_ids=ids)[0]
    code = dictionary.encode(inputs)
    silent = next(f for f in range(dictionary.d_sae) if not bool(((code.indices == f) & (code.values > 0)).any()))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        unchanged = clamped_logits(model, dictionary.module, "mlp_in.2", {silent: 0.0}, ids, target_hook="mlp_out.2")
        steered = clamped_logits(model, dictionary.module, "mlp_in.2", {silent: 5.0}, ids, target_hook="mlp_out.2")
        mlp = hook_module(model, parse_hook("mlp_out.2", model.config.num_hidden_layers))
        handle = mlp.register_forward_hook(lambda module, args, output: output + 5.0 * dictionary.W_dec[silent])
        try:
            expected = model(input_ids=ids).logits
        finally:
            handle.remove()
    assert torch.equal(unchanged, clean)
    torch.testing.assert_close(steered, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, clean)


def test_the_atlas_of_a_transcoder(harvested_pair, trained_transcoder, capsys):
    name = trained_transcoder["name"]
    code = main(["analysis", "features", "--run", str(harvested_pair), "--dictionary", name, "--workers", "0",
                 "--set", "top_examples=5", "--set", "samples=16"])
    assert code == 0, capsys.readouterr().err
    folder = harvested_pair / "analysis" / name
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["hook"], summary["target_hook"]) == ("mlp_in.2", "mlp_out.2")
    assert pq.read_table(folder / "features.parquet").num_rows == summary["d_sae"]
    _, meta = read_data_file((folder / "site" / "data" / "meta.js").read_text())
    assert ["target_hook", "mlp_out.2"] in meta["facts"]
