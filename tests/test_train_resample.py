"""Resampling dead latents: planted dead latents come back for every architecture, the optimiser
forgets their state, and a training run with ``resample_every`` resamples and says so."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_topk import RECOVERY, ground_truth, synthetic, write_synthetic_store

from lexica.train.architectures import build
from lexica.train.config import TrainConfig
from lexica.train.fit import fit
from lexica.train.optimizers import new_optimizer
from lexica.train.resample import resample_dead
from lexica.train.step import FiringTracker, train_step

PLANTED = torch.arange(0, 256, 4)  # a quarter of the latents


def firing_on(dictionary, x: torch.Tensor) -> torch.Tensor:
    code = dictionary.encode(x)
    return torch.bincount(code.indices[code.values > 0], minlength=dictionary.d_sae)


@pytest.mark.parametrize("architecture", sorted(RECOVERY))
@pytest.mark.parametrize("resample", [True, False], ids=["resampled", "left dead"])
def test_planted_dead_latents_fire_again_only_when_resampled(architecture, resample):
    truth, generator = ground_truth(), torch.Generator().manual_seed(4)
    options = {key: value for key, value in RECOVERY[architecture][0].items() if key != "prefixes"}
    dictionary = build(architecture, d_in=64, d_sae=256, k=8, seed=0, options=options)
    dictionary.initialise_from(synthetic(2048, truth, generator))
    with torch.no_grad():  # planted: these latents can never win a place or pass a threshold
        dictionary.b_enc[PLANTED] = -1e4
    optimizer = new_optimizer(dictionary, 2e-3, "adam")
    tracker = FiringTracker.create(256, "cpu")
    steps, dead_tokens = 120, 5 * 512
    for step in range(steps):
        dictionary.begin_step(step, steps)
        batch = synthetic(512, truth, generator)
        dead = tracker.tokens_since_fired >= dead_tokens
        output = train_step(dictionary, optimizer, batch, dead if dead.any() else None, 5.0)
        tracker.update(output.fired, 512)
        if resample and (step + 1) % 20 == 0:
            revived = resample_dead(dictionary, optimizer, batch, tracker.tokens_since_fired >= dead_tokens,
                                    torch.Generator().manual_seed(step))
            tracker.tokens_since_fired[revived] = 0
    with torch.no_grad():
        fired = firing_on(dictionary, synthetic(8192, truth, generator))[PLANTED]
    if resample:
        assert (fired > 0).float().mean() >= 0.9, fired
    else:
        assert int(fired.sum()) == 0


def test_resampling_points_latents_at_badly_reconstructed_inputs_and_clears_their_state():
    truth, generator = ground_truth(), torch.Generator().manual_seed(5)
    dictionary = build("topk", d_in=64, d_sae=256, k=8, seed=0)
    batch = synthetic(512, truth, generator)
    dictionary.initialise_from(batch)
    optimizer = new_optimizer(dictionary, 1e-3, "adam")
    train_step(dictionary, optimizer, batch, None)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[PLANTED] = True
    revived = resample_dead(dictionary, optimizer, batch, dead, torch.Generator().manual_seed(0))
    assert torch.equal(revived, PLANTED)
    with torch.no_grad():
        centred = batch - dictionary.b_dec
        cosines = torch.nn.functional.normalize(dictionary.W_dec[PLANTED], dim=1) @ \
            torch.nn.functional.normalize(centred, dim=1).t()
        assert float(cosines.max(1).values.min()) > 0.999  # each row is one input's direction
        torch.testing.assert_close(dictionary.W_dec[PLANTED].norm(dim=1), torch.ones(len(PLANTED)))
        assert torch.all(dictionary.b_enc[PLANTED] == 0)
    for parameter, dim in ((dictionary.W_dec, 0), (dictionary.W_enc, 1), (dictionary.b_enc, 0)):
        for moment in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[parameter][moment]
            assert not state.index_select(dim, PLANTED).any() and state.abs().sum() > 0


def test_schedule_free_restarts_the_average_of_a_resampled_latent():
    truth, generator = ground_truth(), torch.Generator().manual_seed(6)
    dictionary = build("topk", d_in=64, d_sae=256, k=8, seed=0)
    batch = synthetic(512, truth, generator)
    dictionary.initialise_from(batch)
    optimizer = new_optimizer(dictionary, 1e-2, "signsgd", "schedule-free")
    for _ in range(3):
        train_step(dictionary, optimizer, batch, None)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[PLANTED] = True
    resample_dead(dictionary, optimizer, batch, dead, torch.Generator().manual_seed(0))
    trained = dictionary.W_dec[PLANTED].detach().clone()
    optimizer.eval()  # the averaged weights of a resampled latent are its new weights
    torch.testing.assert_close(dictionary.W_dec[PLANTED].detach(), trained)


def test_a_training_run_resamples_every_n_steps(tmp_path):
    truth, generator = ground_truth(), torch.Generator().manual_seed(7)
    url = write_synthetic_store(str(tmp_path / "run"), synthetic(16_384, truth, generator) * 5, shards=2)
    # Far more latents than the data uses (k 2 of 2,048): many die between resamplings.
    summary = fit(TrainConfig(eval_tokens=0, run=str(tmp_path / "run"), store=url, width="32x", k=2, batch_size=512,
                              workers=0, buffer_rows=4096, log_every=8, lr_warmup_steps=2, dead_tokens=2048,
                              resample_every=8))
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "dictionaries" / summary["name"] / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["resampled"] > 0
    assert [entry["resampled"] for entry in metrics] == sorted(entry["resampled"] for entry in metrics)
