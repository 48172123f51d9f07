"""The sparse kernels give the same values and gradients as plain dense autograd."""

from __future__ import annotations

import pytest
import torch
from native_builds import portable_build, require_c_compiler

from lexica.train import native, sparse
from lexica.train.sparse import (
    decode_backward_kernel,
    fixed_k_pattern,
    native_decode_backward,
    select_with_sparse_grad,
    sparse_decode,
    sparse_pattern,
)


def random_problem(seed: int, batch: int, d_in: int, d_sae: int):
    torch.manual_seed(seed)
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    parameters = {name: torch.randn(*shape, dtype=torch.float64) for name, shape in shapes.items()}
    return torch.randn(batch, d_in, dtype=torch.float64), parameters, torch.randn(batch, d_in, dtype=torch.float64)


def assert_same_values_and_gradients(dense_loss, sparse_loss, parameters: dict) -> None:
    dense = {name: value.clone().requires_grad_() for name, value in parameters.items()}
    sparse = {name: value.clone().requires_grad_() for name, value in parameters.items()}
    dense_value, sparse_value = dense_loss(dense), sparse_loss(sparse)
    dense_value.backward()
    sparse_value.backward()
    torch.testing.assert_close(sparse_value, dense_value)
    for name in parameters:
        torch.testing.assert_close(sparse[name].grad, dense[name].grad, msg=name)


def test_sparse_topk_encode_decode_gradients_match_dense_autograd():
    batch, d_sae, k = 64, 96, 5
    x, parameters, target = random_problem(0, batch, 16, d_sae)

    def dense_loss(p):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        values, indices = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
        return ((codes @ p["W_dec"] + p["b_dec"] - target) ** 2).sum()

    def sparse_loss(p):
        centered = x - p["b_dec"].detach()
        with torch.no_grad():
            values, indices = torch.addmm(p["b_enc"], centered, p["W_enc"]).topk(k, dim=1)
        pattern = fixed_k_pattern(indices, d_sae)
        values = select_with_sparse_grad(centered, p["W_enc"], p["b_enc"], p["b_dec"], values, pattern)
        return ((sparse_decode(values.relu(), p["W_dec"], pattern) + p["b_dec"] - target) ** 2).sum()

    assert_same_values_and_gradients(dense_loss, sparse_loss, parameters)


def test_flat_codes_with_per_row_counts_match_dense_autograd():
    """BatchTopK's shape: the k·batch largest of the whole batch, a different count per row."""
    batch, d_sae, k = 32, 80, 4
    x, parameters, target = random_problem(1, batch, 12, d_sae)

    def dense_loss(p):
        pre = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
        values, flat = pre.reshape(-1).topk(k * batch)
        codes = torch.zeros(batch * d_sae, dtype=pre.dtype).scatter(0, flat, values).view(batch, d_sae)
        return ((codes @ p["W_dec"] + p["b_dec"] - target) ** 2).sum()

    def sparse_loss(p):
        centered = x - p["b_dec"].detach()
        with torch.no_grad():
            values, flat = torch.addmm(p["b_enc"], centered, p["W_enc"]).relu().reshape(-1).topk(k * batch)
            rows, latents = flat // d_sae, flat % d_sae
            order = rows.argsort()
            rows, latents, values = rows[order], latents[order], values[order]
        pattern = sparse_pattern(rows, latents, batch, d_sae)
        values = select_with_sparse_grad(centered, p["W_enc"], p["b_enc"], p["b_dec"], values, pattern)
        decoded = sparse_decode(values.relu(), p["W_dec"], pattern)
        return ((decoded + p["b_dec"] - target) ** 2).sum()

    assert_same_values_and_gradients(dense_loss, sparse_loss, parameters)


def test_pair_dots_equal_a_direct_product_with_empty_rows_and_latents():
    """The code gradient on the CPU (a sampled product) equals embedding_bag's own backward (the
    path elsewhere) and ⟨left[row], right[latent]⟩ computed pair by pair."""
    generator = torch.Generator().manual_seed(2)
    batch, d_sae, d_in = 40, 30, 12
    active = torch.rand(batch, d_sae, generator=generator) < 0.1
    active[7] = False  # a row with no pairs; latents with none occur too at this density
    rows, latents = active.nonzero(as_tuple=True)
    pattern = sparse_pattern(rows, latents, batch, d_sae)
    left, right = torch.randn(batch, d_in, generator=generator), torch.randn(d_sae, d_in, generator=generator)
    expected = (left[rows] * right[latents]).sum(1)
    torch.testing.assert_close(pattern.pair_dots(left, right), expected)
    _, offset2bag, _, _ = torch.ops.aten._embedding_bag(right, latents, pattern.offsets, False, 0, False,
                                                         torch.ones(len(rows)), False, -1)
    torch.testing.assert_close(torch.ops.aten._embedding_bag_per_sample_weights_backward(
        left, right, latents, pattern.offsets, offset2bag, 0, -1), expected)


def decode_backward_by_pytorch(grad_output, W_dec, values, pattern):
    return pattern.pair_dots(grad_output, W_dec), pattern.sum_by_latent(values, grad_output)


@pytest.mark.parametrize(("batch", "d_sae", "d_in", "density"), [(40, 30, 12, 0.1), (300, 700, 515, 0.02),
                                                                  (512, 4096, 512, 32 / 4096), (600, 20, 40, 0.5)])
def test_native_decode_backward_equals_the_pytorch_path(batch, d_sae, d_in, density, tmp_path, monkeypatch):
    """Code and decoder gradients by the C kernel (OpenMP/AVX build, and a generic single-thread
    build) equal the sampled product and the embedding_bag; d_in 515 and 40 leave a tail beyond
    the 32-column chunks, density 0.5 gives latents several groups of 64 pairs, and rows and
    latents with no pairs occur."""
    require_c_compiler()
    assert decode_backward_kernel() is not None, "a C compiler is present, yet the kernel did not build"
    generator = torch.Generator().manual_seed(batch + d_sae)
    active = torch.rand(batch, d_sae, generator=generator) < density
    active[3] = False
    rows, latents = active.nonzero(as_tuple=True)
    pattern = sparse_pattern(rows, latents, batch, d_sae)
    grad_output = torch.randn(batch, d_in, generator=generator)
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    values = torch.randn(len(rows), generator=generator)
    expected = decode_backward_by_pytorch(grad_output, W_dec, values, pattern)
    actual = native_decode_backward(grad_output, W_dec, values, pattern)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-4)
    portable = portable_build("decode_backward", tmp_path, decode_backward_kernel())
    monkeypatch.setattr(sparse, "decode_backward_kernel", lambda: portable)
    actual = native_decode_backward(grad_output, W_dec, values, pattern)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-4)


def test_sparse_decode_backward_takes_the_kernel_only_where_it_applies(monkeypatch):
    """float32 on the CPU: the kernel; float64: PyTorch. Both give the same gradients."""
    calls = []
    original = sparse.native_decode_backward

    def counting(*arguments):
        result = original(*arguments)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(sparse, "native_decode_backward", counting)
    x, parameters, target = random_problem(5, 64, 16, 96)
    indices = torch.randn(64, 96).topk(5, dim=1).indices
    pattern = fixed_k_pattern(indices, 96)
    gradients = {}
    code = torch.rand(64 * 5, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        values = code.to(dtype).clone().requires_grad_()
        W_dec = parameters["W_dec"].to(dtype).clone().requires_grad_()
        ((sparse_decode(values, W_dec, pattern, target=target.to(dtype))) ** 2).sum().backward()
        gradients[dtype] = (values.grad, W_dec.grad)
    kernel_built = native.compiler() is not None
    assert calls == [False, kernel_built]
    for float64, float32 in zip(gradients[torch.float64], gradients[torch.float32], strict=True):
        torch.testing.assert_close(float32.double(), float64, rtol=1e-4, atol=1e-4)
