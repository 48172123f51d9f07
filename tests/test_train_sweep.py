"""Sweeps: every dictionary of one job equals the same dictionary trained alone, from one read."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from lexica.errors import ConfigError
from lexica.train.config import TrainConfig
from lexica.train.fit import fit
from lexica.train.plan import plan_job
from lexica.train.sweep import sweep_variants

VARIANTS = [{"architecture": "topk", "k": 8}, {"architecture": "batchtopk", "k": 4, "lr": 0.003},
            {"architecture": "relu", "seed": 3, "extra": {"l1_coefficient": 3.0}}]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    raw = synthetic(8_000, ground_truth(), torch.Generator().manual_seed(7)) * 10
    return write_synthetic_store(str(tmp_path_factory.mktemp("sweep-store") / "run"), raw, shards=2)


def base_config(run, store_url, **knobs) -> TrainConfig:
    values = dict(eval_tokens=0, run=str(run), store=store_url, width="4x", k=8, batch_size=512, buffer_rows=4096,
                  log_every=5, lr=2e-3, workers=0, tokens=12_288, seed=1)
    return TrainConfig(**{**values, **knobs})


def test_each_dictionary_of_a_sweep_equals_it_trained_alone(store_url, tmp_path):
    swept = fit(base_config(tmp_path / "sweep", store_url, sweep=VARIANTS))
    names = [summary["name"] for summary in swept["dictionaries"]]
    assert names == ["topk-resid_post.0-4x-k8", "batchtopk-resid_post.0-4x-k4-lr0.003",
                     "relu-resid_post.0-4x-k8-seed3-l1coefficient3"]
    for variant, summary in zip(VARIANTS, swept["dictionaries"], strict=True):
        # Alone: the variant's knobs, but the data order of the sweep's seed (1).
        knobs = {**variant, "seed": variant.get("seed", 1)}
        alone = fit(base_config(tmp_path / f"alone-{summary['name']}", store_url, **knobs))
        if "seed" in variant:
            continue  # a variant's own seed sets its initialisation only; alone it also sets the data order
        for key, tensor in alone["dictionary"].state_dict().items():
            torch.testing.assert_close(summary["dictionary"].state_dict()[key], tensor, msg=key)
        assert summary["final"]["fvu"] == pytest.approx(alone["final"]["fvu"], rel=1e-5)
        # One read: the whole sweep read what one dictionary alone reads.
        assert summary["final"]["store_bytes_read"] == alone["final"]["store_bytes_read"] > 0
    for summary in swept["dictionaries"]:  # each has its own export, metrics and plot
        folder = tmp_path / "sweep" / "dictionaries" / summary["name"]
        assert (folder / "final" / "sae_weights.safetensors").exists()
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 24 // 5 + 1


def test_a_variants_seed_sets_its_initialisation_not_the_data(store_url, tmp_path):
    swept = fit(base_config(tmp_path / "sweep", store_url, sweep=[{"seed": 1}, {"seed": 2}]))
    first, second = (summary["dictionary"].state_dict() for summary in swept["dictionaries"])
    assert not torch.equal(first["W_enc"], second["W_enc"])
    alone = fit(base_config(tmp_path / "alone", store_url, seed=1))["dictionary"].state_dict()
    torch.testing.assert_close(first["W_dec"], alone["W_dec"])


def test_a_grid_expands_to_every_combination(store_url, tmp_path):
    config = base_config(tmp_path / "grid", store_url, sweep={"k": [4, 8], "width": ["2x", "4x"]})
    assert sweep_variants(config) == [{"k": 4, "width": "2x"}, {"k": 4, "width": "4x"}, {"k": 8, "width": "2x"},
                                      {"k": 8, "width": "4x"}]
    plans = plan_job(config)
    assert [plan.d_sae for plan in plans] == [128, 256, 128, 256]
    assert len({plan.folder for plan in plans}) == 4


@pytest.mark.parametrize("sweep, message", [
    ([{"batch_size": 256}], "'batch_size' is shared by every dictionary of a sweep"),
    ([{"widht": "2x"}], "'widht' is unknown"),
    ([{"k": "eight"}], "train.sweep[0].k = 'eight' is invalid; expected an integer"),
    ({"k": 8}, "train.sweep.k = 8 is invalid; a grid maps each knob to a non-empty list"),
    ("k=8", "expected a list of variants"),
    ([{"k": 8}, {"k": 8}], "would both be named 'topk-resid_post.0-4x-k8'"),
    ([{"k": 300}], "k = 300 is out of range for 256 latents"),
])
def test_bad_sweeps_are_refused_by_name(store_url, tmp_path, sweep, message):
    with pytest.raises(ConfigError) as caught:
        fit(base_config(tmp_path / "bad", store_url, sweep=sweep))
    assert message in str(caught.value)
    assert not (tmp_path / "bad" / "dictionaries").exists()


def test_a_sweep_trains_with_ddp_and_resumes_from_its_checkpoint(ray_cluster, store_url, tmp_path):
    variants = [{"k": 4}, {"architecture": "jumprelu", "name": "jump"}]
    config = base_config(tmp_path / "ddp", store_url, sweep=variants, workers=2, checkpoint_every=10, name="pair")
    two = fit(config)
    one = fit(base_config(tmp_path / "one", store_url, sweep=variants, workers=0, data_lanes=2))
    for ddp, alone in zip(two["dictionaries"], one["dictionaries"], strict=True):
        for key, tensor in alone["dictionary"].state_dict().items():
            torch.testing.assert_close(ddp["dictionary"].state_dict()[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    states = glob.glob(str(tmp_path / "ddp" / "sweeps" / "pair" / "checkpoints" / "checkpoint_*" / "*" / "state.pt"))
    assert {os.path.basename(os.path.dirname(path)) for path in states} == {"topk-resid_post.0-4x-k4", "jump"}
    # Re-running the finished sweep resumes from its last checkpoint: nothing is trained again.
    again = fit(config)
    for before, after in zip(two["dictionaries"], again["dictionaries"], strict=True):
        torch.testing.assert_close(after["dictionary"].state_dict()["W_dec"],
                                   before["dictionary"].state_dict()["W_dec"])
    # The same sweep name with other variants cannot resume that checkpoint: refused by name.
    with pytest.raises(ConfigError, match="holds no state for topk-resid_post.0-4x-k8"):
        fit(base_config(tmp_path / "ddp", store_url, sweep=[*variants, {"k": 8}], workers=2, name="pair"))
