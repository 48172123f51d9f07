"""The statistics pass and the contexts against brute force (every row encoded densely, each feature
sorted on its own), on a harvested store: exact whatever the number of Ray workers, in this
process, with ``max_tokens``, and from object storage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from conftest import sample_texts, write_jsonl

from lexica import storage
from lexica.analysis import atlas, stats
from lexica.analysis.config import AnalysisConfig
from lexica.analysis.contexts import build_contexts, contexts_in_passes, feature_groups
from lexica.analysis.sources import token_strings
from lexica.analysis.stats import compute_statistics, sample_priority
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig, load_tokenizer
from lexica.store import ActivationStore
from lexica.train.architectures import build
from lexica.train.export import export_dictionary, load_dictionary

D_MODEL, D_SAE, TOP, SAMPLES, BATCH_ROWS = 64, 256, 6, 10, 256


@dataclass
class DenseCodes:
    """Every counted row and its dense code: what the statistics must agree with."""

    codes: np.ndarray  # float32 [rows, d_sae]
    doc_ids: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray


def dense_codes(store: ActivationStore, dictionary, max_tokens: int | None = None) -> DenseCodes:
    """The pass's batches (same size, per part, cut at max_tokens) so encodes agree bit for bit."""
    codes, doc_ids, positions, token_ids, remaining = [], [], [], [], max_tokens or store.num_rows
    with torch.inference_mode():
        for batch in store.iter_batches(BATCH_ROWS):
            take = min(remaining, len(batch.doc_id))
            if take == 0:
                break
            code = dictionary.encode(batch.activation[:take].float())
            dense = torch.zeros(take, D_SAE).scatter_add_(1, code.indices, code.values)
            codes.append(dense.numpy())
            doc_ids.append(batch.doc_id[:take].numpy())
            positions.append(batch.position[:take].numpy())
            token_ids.append(batch.token_id[:take].numpy())
            remaining -= take
    return DenseCodes(*(np.concatenate(parts) for parts in (codes, doc_ids, positions, token_ids)))


def assert_matches_brute_force(result: stats.FeatureStatistics, dense: DenseCodes) -> None:
    assert result.tokens == len(dense.codes) and result.d_sae == D_SAE
    fires = (dense.codes > 0).sum(0)
    np.testing.assert_array_equal(result.fires, fires)
    np.testing.assert_array_equal(result.max_activation, dense.codes.max(0))
    np.testing.assert_allclose(result.activation_sum, dense.codes.astype(np.float64).sum(0), rtol=1e-9)
    for feature in range(D_SAE):
        firing = np.flatnonzero(dense.codes[:, feature] > 0)
        values = dense.codes[firing, feature]
        doc_ids, positions = dense.doc_ids[firing], dense.positions[firing]
        np.testing.assert_array_equal(
            result.histogram[feature], np.bincount(atlas.histogram_bin(values), minlength=atlas.HISTOGRAM_BINS))
        top = np.lexsort((positions, doc_ids, -values))[:TOP]
        assert result.top_count[feature] == len(top)
        np.testing.assert_array_equal(result.top_activation[feature, :len(top)], values[top])
        np.testing.assert_array_equal(result.top_doc_id[feature, :len(top)], doc_ids[top])
        np.testing.assert_array_equal(result.top_position[feature, :len(top)], positions[top])
        priorities = sample_priority(np.full(len(firing), feature), doc_ids, positions, D_SAE)
        sample = np.lexsort((positions, doc_ids, priorities))[:SAMPLES]
        assert result.sample_count[feature] == len(sample)
        np.testing.assert_array_equal(result.sample_priority[feature, :len(sample)], priorities[sample])
        np.testing.assert_array_equal(result.sample_doc_id[feature, :len(sample)], doc_ids[sample])
        np.testing.assert_array_equal(result.sample_position[feature, :len(sample)], positions[sample])
        np.testing.assert_array_equal(result.sample_activation[feature, :len(sample)], values[sample])


def assert_identical(first: stats.FeatureStatistics, second: stats.FeatureStatistics) -> None:
    for name, value in vars(first).items():
        np.testing.assert_array_equal(value, getattr(second, name), err_msg=name)


@pytest.fixture(scope="module")
def harvested(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("statistics")
    corpus = write_jsonl(folder / "docs.jsonl", sample_texts(32, seed=11))
    config = HarvestConfig(run=str(folder / "run"), model=ModelConfig(path=str(tiny_models["llama"])),
                           hook="resid_post.2", corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=8),
                           context_length=32, batch_tokens=8 * 32, workers=WorkersConfig(actors=0))
    store = ActivationStore(run_harvest(config.validate()).store_url)
    assert store.d_model == D_MODEL and len(store.commits()) == 4
    return store, tiny_models["llama"], folder


@pytest.fixture(scope="module")
def dictionaries(harvested):
    """A TopK dictionary (through export and load) and a ReLU one whose features fire at varied
    rates, a few never."""
    store, _, folder = harvested
    topk = build("topk", d_in=D_MODEL, d_sae=D_SAE, k=8)
    url = export_dictionary(topk, 1.0, str(folder / "topk" / "final"), metadata={})
    relu = build("relu", d_in=D_MODEL, d_sae=D_SAE)
    with torch.no_grad():
        sample = next(store.iter_batches(1024)).activation.float()
        relu.b_dec.copy_(sample.mean(0))
        pre_activations = (sample - relu.b_dec) @ relu.W_enc
        rates = torch.linspace(0.02, 0.4, D_SAE)[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(0))]
        relu.b_enc.copy_(-torch.quantile(pre_activations, 1 - rates, dim=0).diagonal())
        relu.b_enc[:5] = -1e6
    return {"topk": load_dictionary(url), "relu": relu.eval()}


def config(**overrides) -> AnalysisConfig:
    values = {"batch_rows": BATCH_ROWS, "top_examples": TOP, "samples": SAMPLES, "workers": 0,
              "window_before": 3, "window_after": 2, **overrides}
    return AnalysisConfig(**values).validate()


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_statistics_equal_brute_force_in_process_and_on_ray(architecture, harvested, dictionaries, ray_cluster,
                                                            monkeypatch):
    store, _, _ = harvested
    dictionary = dictionaries[architecture]
    dense = dense_codes(store, dictionary)
    fires = (dense.codes > 0).sum(0)
    assert fires.min() < SAMPLES < fires.max() and len(set(fires.tolist())) > 10  # short and full example lists
    distributed = compute_statistics(store, dictionary, config(workers=2))
    assert_matches_brute_force(distributed, dense)
    # In process, merging candidates every few batches: the filters then drop most of them.
    monkeypatch.setattr(stats, "MERGE_AT_LEAST", 64)
    in_process = compute_statistics(store, dictionary, config())
    assert_identical(in_process, distributed)
    one_worker = compute_statistics(store, dictionary, config(workers=1))
    assert_identical(one_worker, distributed)
    if architecture == "relu":
        assert (distributed.fires[:5] == 0).all() and distributed.top_count[:5].sum() == 0
    else:
        assert distributed.fires.sum() == 8 * distributed.tokens


def test_max_tokens_counts_the_first_rows_in_shard_order(harvested, dictionaries, ray_cluster):
    store, _, _ = harvested
    commits = store.commits()
    max_tokens = commits[0].rows + commits[1].rows // 2 + 7  # ends inside the second part
    for workers in (0, 2):
        result = compute_statistics(store, dictionaries["relu"], config(workers=workers, max_tokens=max_tokens))
        assert_matches_brute_force(result, dense_codes(store, dictionaries["relu"], max_tokens))


def test_feature_and_example_tables(harvested, dictionaries):
    store, _, _ = harvested
    result = compute_statistics(store, dictionaries["relu"], config())
    features = result.features_table()
    assert features.schema.equals(atlas.FEATURES_SCHEMA) and features.num_rows == D_SAE
    assert features.column("histogram").to_pylist() == result.histogram.tolist()
    np.testing.assert_allclose(features.column("mean_activation").to_numpy()[5:],
                               result.activation_sum[5:] / result.fires[5:], rtol=1e-6)
    assert features.column("density").to_numpy()[7] == result.fires[7] / result.tokens

    bands, per_band = 3, 2
    examples = result.examples_table(bands, per_band).to_pylist()
    for feature in range(D_SAE):
        rows = [row for row in examples if row["feature"] == feature]
        top = [row for row in rows if row["kind"] == "top"]
        quantile = [row for row in rows if row["kind"] == "quantile"]
        assert rows == top + quantile
        count = result.top_count[feature]
        assert [(row["rank"], row["band"], row["doc_id"], row["position"]) for row in top] == [
            (rank, -1, result.top_doc_id[feature, rank], result.top_position[feature, rank]) for rank in range(count)]
        samples = sorted(list(zip(result.sample_activation[feature], result.sample_doc_id[feature],
                                  result.sample_position[feature], strict=True))[:result.sample_count[feature]])
        expected = []
        for band in range(bands):
            members = samples[band * len(samples) // bands:(band + 1) * len(samples) // bands]
            if len(members) <= per_band:
                chosen = members
            else:
                chosen = [members[(2 * slot + 1) * len(members) // (2 * per_band)] for slot in range(per_band)]
            expected += [(len(expected) + index, band, *member) for index, member in enumerate(chosen)]
        found = [(row["rank"], row["band"], np.float32(row["activation"]), row["doc_id"], row["position"])
                 for row in quantile]
        assert found == expected
    assert sum(row["kind"] == "quantile" for row in examples) > D_SAE  # bands were filled


def test_contexts_are_store_rows_with_the_features_values(harvested, dictionaries, ray_cluster):
    store, model, _ = harvested
    dictionary = dictionaries["topk"]
    result = compute_statistics(store, dictionary, config())
    examples = result.examples_table(2, 1)
    tokenizer = load_tokenizer(ModelConfig(path=str(model)))
    contexts = build_contexts(store, dictionary, examples, tokenizer, config())
    assert contexts.schema.equals(atlas.CONTEXTS_SCHEMA)
    assert contexts.select(examples.column_names).equals(examples)
    assert build_contexts(store, dictionary, examples, tokenizer, config(workers=2)).equals(contexts)
    # In passes of a few features each (bounded memory at any width): the same rows, feature by feature.
    groups = feature_groups(examples, window=6, tokens_per_pass=6 * 7)
    assert len(groups) > 3 and all(examples["feature"][group.start].as_py() != examples["feature"][group.start - 1]
                                   .as_py() for group in groups[1:])
    passes = list(contexts_in_passes(store, dictionary, examples, tokenizer, config(), tokens_per_pass=6 * 7))
    joined = pa.concat_tables(passes)
    assert len(passes) == len(groups) and joined.drop_columns(["values"]).equals(contexts.drop_columns(["values"]))
    # Values agree to float rounding: a pass encodes other rows beside each, so matmul blocks differ.
    np.testing.assert_allclose(pc.list_flatten(joined["values"]).to_numpy(),
                               pc.list_flatten(contexts["values"]).to_numpy(), rtol=1e-5, atol=1e-6)

    dense = dense_codes(store, dictionary)
    clipped = 0
    for row in contexts.to_pylist():
        in_window = np.flatnonzero((dense.doc_ids == row["doc_id"]) & (dense.positions >= row["position"] - 3)
                                   & (dense.positions <= row["position"] + 2))
        clipped += len(in_window) < 6
        assert row["token_ids"] == dense.token_ids[in_window].tolist()
        assert row["tokens"] == token_strings(tokenizer, row["token_ids"])
        np.testing.assert_allclose(row["values"], dense.codes[in_window, row["feature"]], rtol=1e-5, atol=1e-6)
        assert dense.positions[in_window[row["center"]]] == row["position"]
        assert row["values"][row["center"]] == pytest.approx(row["activation"], rel=1e-5)
    assert clipped > 0  # windows at document starts are cut, not padded


def test_statistics_and_contexts_read_object_storage(harvested, dictionaries, s3_server):
    store, model, _ = harvested
    _, options = s3_server
    fs, _ = storage.url_to_fs("s3://lexica-test", options)
    fs.put(store.root, "lexica-test/statistics-store", recursive=True)
    remote = ActivationStore("s3://lexica-test/statistics-store", options)
    dictionary = dictionaries["relu"]
    local_result = compute_statistics(store, dictionary, config(max_tokens=300))
    remote_result = compute_statistics(remote, dictionary, config(max_tokens=300))
    assert_identical(remote_result, local_result)
    examples = local_result.examples_table(1, 1)
    tokenizer = load_tokenizer(ModelConfig(path=str(model)))
    assert build_contexts(remote, dictionary, examples, tokenizer, config()).equals(
        build_contexts(store, dictionary, examples, tokenizer, config()))
