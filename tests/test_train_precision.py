"""train.precision bf16-mixed on the CPU (where PyTorch multiplies in bfloat16 too): the dense
products run in bfloat16, the master weights and optimiser state stay float32, and training
reaches what float32 training reaches."""

from __future__ import annotations

import pytest
import torch
from test_train_topk import ground_truth, synthetic

from lexica.train.architectures import build
from lexica.train.optimizers import new_optimizer
from lexica.train.step import train_step

ARCHITECTURES = ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"]


def train(architecture: str, compute_dtype: torch.dtype, steps: int = 60) -> tuple[torch.nn.Module, float]:
    generator = torch.Generator().manual_seed(3)
    truth = ground_truth()
    data = [synthetic(1024, truth, generator) for _ in range(8)]
    torch.manual_seed(0)
    dictionary = build(architecture, d_in=data[0].shape[1], d_sae=256, k=8, seed=0)
    dictionary.compute_dtype = compute_dtype
    dictionary.initialise_from(data[0])
    optimizer = new_optimizer(dictionary, 2e-3)
    variance = float(data[0].var(0).sum())
    for step in range(steps):
        dictionary.begin_step(step, steps)
        output = train_step(dictionary, optimizer, data[step % len(data)], None, variance)
    return dictionary, float(output.terms["fvu"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bf16_mixed_trains_like_fp32(architecture):
    reference, reference_fvu = train(architecture, torch.float32)
    mixed, mixed_fvu = train(architecture, torch.bfloat16)
    assert all(parameter.dtype == torch.float32 for parameter in mixed.parameters())  # fp32 master weights
    assert abs(mixed_fvu - reference_fvu) < 0.02 + 0.05 * reference_fvu, (mixed_fvu, reference_fvu)
    # The same dictionary, up to bfloat16's rounding of the products along the way (ReLU's early
    # dense steps also take their encoder gradient from the bfloat16 product, hence more drift).
    bound = 0.2 if architecture == "relu" else 0.1
    for name, tensor in reference.state_dict().items():
        difference = (mixed.state_dict()[name] - tensor).norm() / tensor.norm().clamp_min(1e-6)
        assert difference < bound, f"{name}: relative difference {difference:.3f}"


def test_bf16_mixed_multiplies_in_bfloat16():
    dictionary = build("topk", d_in=16, d_sae=64, k=4, seed=0)
    dictionary.compute_dtype = torch.bfloat16
    x = torch.randn(32, 16)
    assert dictionary.pre_activations(x).dtype == torch.bfloat16
    assert dictionary.pre_activations(x, reuse=True).dtype == torch.bfloat16
    output = dictionary(x, None, 1.0)
    output.loss.backward()
    assert output.error.dtype == torch.float32 and dictionary.W_enc.grad.dtype == torch.float32
