"""Architecture internals against plain dense references: the sparse training paths must compute
the method's loss and gradients exactly, not an approximation of them."""

from __future__ import annotations

import pytest
import torch

from lexica.train.architectures import build


def double_dictionary(architecture: str, seed: int = 0, **options) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    dictionary = build(architecture, d_in=16, d_sae=64, k=6, seed=seed, options=options).double()
    x = torch.randn(48, 16, dtype=torch.float64) * 2 + 0.5
    dictionary.initialise_from(x)
    with torch.no_grad():
        dictionary.b_enc.normal_(0, 0.1)
    return dictionary, x


def gradients(dictionary: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.clone() for name, parameter in dictionary.named_parameters()}


def assert_matches_reference(dictionary: torch.nn.Module, x: torch.Tensor, reference_loss,
                             dead_mask: torch.Tensor | None = None):
    output = dictionary(x, dead_mask, 3.0)
    output.loss.backward()
    trained = gradients(dictionary)
    dictionary.zero_grad()
    expected = reference_loss(dictionary)
    expected.backward()
    torch.testing.assert_close(output.loss, expected)
    for name, grad in gradients(dictionary).items():
        torch.testing.assert_close(trained[name], grad, msg=name)
    return output


def test_jumprelu_straight_through_gradients_equal_a_dense_reference():
    dictionary, x = double_dictionary("jumprelu", l0_coefficient=0.1, bandwidth=0.5)
    assert 0 < float(dictionary.encode(x).values.gt(0).sum(1).float().mean()) < 64

    def reference(d):
        threshold = d.threshold
        pre = (x - d.b_dec) @ d.W_enc + d.b_enc
        active = (pre > threshold.detach()).double()
        kernel = ((pre.detach() - threshold.detach()).abs() < d.bandwidth / 2).double()
        moved = threshold - threshold.detach()  # zero forward; carries the pseudo-derivatives
        codes = pre * active + moved * (-threshold.detach() / d.bandwidth * kernel)
        steps = active + moved * (-kernel / d.bandwidth)
        mse = ((codes @ d.W_dec + d.b_dec - x) ** 2).sum(1).mean() / 3.0
        return mse + 0.1 * steps.sum() / len(x)

    assert_matches_reference(dictionary, x, reference)


def relu_reference(x: torch.Tensor, l1_coefficient: float):
    def reference(d):
        codes = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
        mse = ((codes @ d.W_dec + d.b_dec - x) ** 2).sum(1).mean()
        return (mse + l1_coefficient * (codes * d.W_dec.norm(dim=1)).sum(1).mean()) / 3.0

    return reference


def test_relu_sparse_and_dense_paths_equal_the_l1_reference():
    for sparse_path in (False, True):
        dictionary, x = double_dictionary("relu", l1_coefficient=0.7)
        dictionary.sparse_path = sparse_path
        assert_matches_reference(dictionary, x, relu_reference(x, 0.7))


def test_relu_sparsity_warmup_scales_the_penalty_from_zero():
    dictionary, x = double_dictionary("relu", l1_coefficient=0.7, sparsity_warmup=0.1)
    dictionary.begin_step(0, 100)  # first of ten warm-up steps: a tenth of the coefficient
    assert_matches_reference(dictionary, x, relu_reference(x, 0.07))


def test_batchtopk_keeps_the_batch_wide_largest_and_infers_with_its_threshold():
    dictionary, x = double_dictionary("batchtopk")
    output = dictionary(x, None, 3.0)
    with torch.no_grad():
        pre = (x - dictionary.b_dec) @ dictionary.W_enc + dictionary.b_enc
    kept = torch.zeros_like(pre, dtype=torch.bool)
    kept.view(-1)[pre.view(-1).topk(len(x) * 6).indices] = True
    chosen = torch.zeros_like(kept)
    rows = torch.arange(len(x)).unsqueeze(1).expand_as(output.code.indices)
    chosen[rows[output.code.values > 0], output.code.indices[output.code.values > 0]] = True
    assert torch.equal(chosen, kept & (pre > 0))
    counts = chosen.sum(1)
    assert counts.float().mean() == 6 and counts.min() < counts.max()  # per-token counts vary
    # Inference has no batch: latents above the running threshold (the smallest kept value).
    threshold = float(dictionary.threshold[0])
    assert threshold == float(pre[kept].min())
    code = dictionary.encode(x)
    assert torch.equal(code.values.gt(0).sum(1), (pre > threshold).sum(1))


@pytest.mark.parametrize("dead_every", [3, 20, 64, 1],
                         ids=["a third dead", "fewer dead than aux_k", "one dead", "all dead"])
def test_topk_with_auxk_equals_a_dense_reference(dead_every):
    """AuxK selects among gathered dead columns (more dead than aux_k), takes every dead latent
    (fewer), or masks the full width (most latents dead): each must equal the dense reference."""
    dictionary, x = double_dictionary("topk", aux_k=5)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::dead_every] = True
    aux_k = min(5, int(dead.sum()))

    def reference(d):
        pre = (x - d.b_dec) @ d.W_enc + d.b_enc
        values, indices = pre.topk(6, dim=1)
        codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
        reconstruction = codes @ d.W_dec + d.b_dec
        error = reconstruction - x
        fvu = error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=1)
        aux_codes = torch.zeros_like(pre).scatter(1, aux_indices, aux_values.relu())
        residual = (x - reconstruction).detach()
        auxk = (aux_codes @ d.W_dec - residual).pow(2).sum(1).mean() / (3.0 * float(fvu.detach()) + 1e-12)
        return error.pow(2).sum(1).mean() / 3.0 + d.aux_coefficient * auxk

    assert assert_matches_reference(dictionary, x, reference, dead).terms["auxk"] > 0


def test_matryoshka_sums_each_prefix_loss_and_equals_a_dense_reference():
    """Every prefix of the latents (16, 32, then all 64) reconstructs from its own share of the
    batch-wide top-k selection; the loss is the sum of the prefixes' losses."""
    dictionary, x = double_dictionary("matryoshka", prefixes=[16, 32])
    assert dictionary.prefixes == [16, 32, 64]

    def reference(d):
        pre = (x - d.b_dec) @ d.W_enc + d.b_enc
        kept = torch.zeros_like(pre, dtype=torch.bool)
        kept.view(-1)[pre.detach().view(-1).topk(len(x) * 6).indices] = True
        codes = torch.where(kept, pre, 0.0).relu()
        loss = 0.0
        for width in (16, 32, 64):
            error = codes[:, :width] @ d.W_dec[:width] + d.b_dec - x
            loss = loss + error.pow(2).sum(1).mean() / 3.0
        return loss

    output = assert_matches_reference(dictionary, x, reference)
    assert output.terms["prefix_loss"] > 0
    assert build("matryoshka", d_in=16, d_sae=4096, k=6).prefixes == [256, 512, 1024, 2048, 4096]


def test_matryoshka_prefixes_are_checked():
    from lexica.config import ConfigError

    for prefixes in ([32, 16], [0, 8], [8, 8], "16"):
        with pytest.raises(ConfigError, match="prefixes"):
            build("matryoshka", d_in=16, d_sae=64, k=6, options={"prefixes": prefixes})
    with pytest.raises(ConfigError, match="wider than the dictionary"):
        build("matryoshka", d_in=16, d_sae=64, k=6, options={"prefixes": [16, 128]})
