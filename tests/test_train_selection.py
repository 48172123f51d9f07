"""Grouped top-k selection returns exactly what torch.topk returns (as sets of values)."""

from __future__ import annotations

import pytest
import torch

from train.selection import group_size, topk_rows


def assert_same_as_torch_topk(matrix: torch.Tensor, k: int) -> None:
    values, indices = topk_rows(matrix, k)
    expected, _ = matrix.topk(k, dim=1)
    assert values.shape == indices.shape == (len(matrix), k)
    torch.testing.assert_close(values.sort(dim=1, descending=True).values, expected, rtol=0, atol=0)
    assert torch.equal(matrix.gather(1, indices), values)  # each value sits at its index
    assert all(len(set(row.tolist())) == k for row in indices)  # no column chosen twice


@pytest.mark.parametrize(("width", "k"), [(4096, 32), (4608, 32), (16384, 64), (2048, 8), (4096, 1)])
def test_grouped_path_equals_torch_topk(width, k):
    assert group_size(width, k) >= 8  # these shapes take the grouped path
    generator = torch.Generator().manual_seed(width + k)
    assert_same_as_torch_topk(torch.randn(64, width, generator=generator), k)


def test_one_group_holding_all_the_winners():
    """The k largest all in one strided group: only that group's maxima are large, yet the other
    k - 1 chosen groups must not push any winner out."""
    matrix = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    groups = 4096 // group_size(4096, 32)
    matrix[:, 5::groups] += 100  # group 5: columns 5, 5 + G, ... (8 of them)
    matrix[:, 7::groups] += 50
    assert_same_as_torch_topk(matrix, 32)


def test_ties_and_masked_columns_give_torch_topk_values():
    generator = torch.Generator().manual_seed(2)
    rounded = torch.randint(0, 5, (16, 4096), generator=generator).float()  # massive ties
    assert_same_as_torch_topk(rounded, 32)
    masked = torch.randn(16, 4096, generator=generator)
    masked[:, 20:] = float("-inf")  # fewer finite entries than k: -inf fills in, as in torch.topk
    assert_same_as_torch_topk(masked, 32)
    masked[:, :] = float("-inf")
    masked[:, 3] = 1.0
    assert_same_as_torch_topk(masked, 32)


def test_small_or_odd_shapes_fall_back_to_torch_topk():
    assert group_size(64, 6) == 0 and group_size(4097, 32) == 0 and group_size(4096, 256) == 0
    generator = torch.Generator().manual_seed(3)
    for width, k in ((64, 6), (4097, 32), (4096, 256), (100, 100)):
        assert_same_as_torch_topk(torch.randn(32, width, generator=generator), k)
    assert_same_as_torch_topk(torch.randn(4096, 64, generator=generator).t(), 32)  # not contiguous
    assert_same_as_torch_topk(torch.randn(32, 4096, dtype=torch.float64, generator=generator), 32)
