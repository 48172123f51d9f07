"""The sparse kernels give the same values and gradients as plain dense autograd."""

from __future__ import annotations

import torch

from train.sparse import fixed_k_pattern, select_with_sparse_grad, sparse_decode, sparse_pattern


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
