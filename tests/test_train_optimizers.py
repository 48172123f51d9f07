"""Optimisers: schedule-free averaging equals its definition written out, switches between its two
weight sets exactly, resumes exactly from its state, and every optimiser trains a dictionary."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train_topk import ground_truth, mean_max_cosine, synthetic

from lexica.config import ConfigError
from lexica.train.architectures import build
from lexica.train.config import TrainConfig
from lexica.train.optimizers import ScheduleFree, new_optimizer
from lexica.train.step import FiringTracker, learning_rate, train_step


def quadratic_gradient(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 2 * (weights - target) + 0.1 * torch.sin(7 * weights)  # not a plain sign of the distance


def test_schedule_free_signsgd_equals_the_averaging_written_out():
    generator = torch.Generator().manual_seed(0)
    start, target = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    beta, steps = 0.9, 200
    lrs = [learning_rate(step, steps, 0.05, 8, 0.0) for step in range(steps)]
    parameter = torch.nn.Parameter(start.clone())
    optimizer = new_optimizer(torch.nn.ParameterList([parameter]), lrs[0], "signsgd", "schedule-free", beta)
    # The definition: z steps with the gradient at y; x averages z weighted by lr²; y between them.
    x, z, y, weight_sum = start.clone(), start.clone(), start.clone(), 0.0
    for lr in lrs:
        gradient = quadratic_gradient(y, target)
        z = z - lr * gradient.sign()
        weight_sum += lr * lr
        x = (1 - lr * lr / weight_sum) * x + (lr * lr / weight_sum) * z
        y = (1 - beta) * z + beta * x
        parameter.grad = quadratic_gradient(parameter.detach(), target)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
    torch.testing.assert_close(parameter.detach(), y, rtol=1e-5, atol=1e-6)
    optimizer.eval()
    torch.testing.assert_close(parameter.detach(), x, rtol=1e-5, atol=1e-6)
    assert float((x - target).abs().mean()) < float((start - target).abs().mean()) / 4  # and it converges
    optimizer.train()
    torch.testing.assert_close(parameter.detach(), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="train"):
        optimizer.eval()
        optimizer.step()


@pytest.mark.parametrize("base", ["signsgd", "adam"])
def test_schedule_free_resumes_from_its_state_to_the_same_weights(base):
    truth, generator = ground_truth(), torch.Generator().manual_seed(3)
    batches = [synthetic(256, truth, generator) for _ in range(12)]

    def run(steps: range, dictionary, state=None):
        optimizer = new_optimizer(dictionary, 1e-3, base, "schedule-free")
        if state is not None:
            optimizer.load_state_dict(state)
        for step in steps:
            train_step(dictionary, optimizer, batches[step], None)
        return optimizer

    straight = build("topk", d_in=64, d_sae=256, k=8, seed=0)
    straight.initialise_from(batches[0])
    run(range(12), straight).eval()
    halves = build("topk", d_in=64, d_sae=256, k=8, seed=0)
    halves.initialise_from(batches[0])
    # A copy, as a checkpoint file would be: nothing shared with the first run's live tensors.
    state = copy.deepcopy({"dictionary": halves.state_dict(), "optimizer": run(range(6), halves).state_dict()})
    resumed = build("topk", d_in=64, d_sae=256, k=8, seed=1)  # other weights: all must come from the state
    resumed.load_state_dict(state["dictionary"])
    run(range(6, 12), resumed, state["optimizer"]).eval()
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


# (optimizer, schedule, learning rate): every optimiser must find the true directions. Schedule-free
# averaging lags the iterate it averages, so it takes a larger step for the same progress.
OPTIMISERS = [("adam", "warmup-decay", 4e-3), ("signsgd", "schedule-free", 1e-2), ("adam", "schedule-free", 1e-2),
              ("signsgd", "warmup-decay", 5e-3), ("muon", "warmup-decay", 1e-2)]


@pytest.mark.parametrize(("name", "schedule", "lr"), OPTIMISERS)
def test_every_optimiser_recovers_a_known_sparse_dictionary(name, schedule, lr):
    truth, generator = ground_truth(), torch.Generator().manual_seed(1)
    steps = 700
    dictionary = build("topk", d_in=64, d_sae=1024, k=8, seed=0)
    dictionary.initialise_from(synthetic(4096, truth, generator))
    optimizer = new_optimizer(dictionary, lr, name, schedule)
    tracker = FiringTracker.create(1024, "cpu")
    decay = 0.0 if schedule == "schedule-free" else 0.2
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, 30, decay)
        dead = tracker.tokens_since_fired >= 20_000
        output = train_step(dictionary, optimizer, synthetic(512, truth, generator), dead if dead.any() else None)
        tracker.update(output.fired, 512)
    if isinstance(optimizer, ScheduleFree):
        optimizer.eval()
    held_out = synthetic(2048, truth, generator)
    with torch.no_grad():
        error = dictionary.decode(dictionary.encode(held_out)) - held_out
        fvu = float(error.pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum())
    assert mean_max_cosine(truth, dictionary.W_dec.detach()) > 0.9 and fvu < 0.25, (name, schedule, fvu)


def test_unknown_optimizer_schedule_or_momentum_is_refused_by_name():
    for field, value, message in [("optimizer", "sgd", "optimizer 'sgd' is unknown; expected one of adam"),
                                  ("schedule", "cosine", "schedule 'cosine' is unknown"),
                                  ("momentum", 1.0, "momentum = 1.0 is invalid"),
                                  ("lr", -1.0, "lr = -1.0 is invalid")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{field: value}).validate(64)
