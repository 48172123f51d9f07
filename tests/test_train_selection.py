"""Top-k selection returns exactly what torch.topk returns (as sets of values), by each path:
the C kernel (train/kernels/topk_rows.c, its AVX and its portable build), the grouped PyTorch
path, and torch.topk itself where neither applies."""

from __future__ import annotations

import logging

import pytest
import torch
from native_builds import portable_build, require_c_compiler

from lexica.train import native
from lexica.train.selection import (
    Selection,
    group_size,
    grouped_topk_rows,
    native_group_count,
    native_topk_rows,
    topk_kernel,
    topk_rows,
)


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory):
    """The kernel built without AVX flags or OpenMP: its plain-C helpers and POSIX threads."""
    require_c_compiler()
    return portable_build("topk_rows", tmp_path_factory.mktemp("portable"), topk_kernel())


def by_native(matrix, k):
    require_c_compiler()
    kernel = topk_kernel()
    assert kernel is not None, "a C compiler is present, yet the kernel did not build (see the log)"
    assert native_group_count(matrix.shape[1], k), "this shape does not take the native path"
    return native_topk_rows(matrix, k, kernel)


PATHS = {
    "native": by_native,
    "grouped": grouped_topk_rows,
    "public": topk_rows,
}


def assert_same_as_torch_topk(selection: Selection, matrix: torch.Tensor, k: int) -> None:
    values, indices = selection
    expected, _ = matrix.topk(k, dim=1)
    assert values.shape == indices.shape == (len(matrix), k)
    torch.testing.assert_close(values.sort(dim=1, descending=True).values, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(matrix.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)  # at its index
    assert all(len(set(row.tolist())) == k for row in indices)  # no column chosen twice


SHAPES = [(4096, 32), (4608, 32), (16384, 64), (2048, 8), (4096, 1)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("width", "k"), SHAPES)
def test_each_path_equals_torch_topk(path, width, k):
    assert group_size(width, k) >= 8  # these shapes take the grouped path
    generator = torch.Generator().manual_seed(width + k)
    matrix = torch.randn(64, width, generator=generator)
    assert_same_as_torch_topk(PATHS[path](matrix, k), matrix, k)


@pytest.mark.parametrize(("width", "k"), SHAPES + [(1000, 7), (4097, 32), (600, 65)])
def test_portable_kernel_equals_torch_topk(portable_kernel, width, k):
    """Widths that are not a multiple of the group count or of 8 exercise the kernel's tails."""
    generator = torch.Generator().manual_seed(width * k)
    matrix = torch.randn(70, width, generator=generator)
    assert_same_as_torch_topk(native_topk_rows(matrix, k, portable_kernel), matrix, k)


@pytest.mark.parametrize("rows", [1, 3, 65, 130, 1000])
def test_native_kernel_splits_rows_across_threads(rows):
    generator = torch.Generator().manual_seed(rows)
    matrix = torch.randn(rows, 1000, generator=generator)  # 1000: a tail beyond the whole segments
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            assert_same_as_torch_topk(by_native(matrix, 16), matrix, 16)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("path", PATHS)
def test_one_group_holding_all_the_winners(path):
    """The k largest all in one strided group: only that group's maxima are large, yet the other
    k - 1 chosen groups must not push any winner out."""
    matrix = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    for groups in (4096 // group_size(4096, 32), native_group_count(4096, 32)):
        matrix[:, 5::groups] += 100  # one group: columns 5, 5 + G, ...
        matrix[:, 7::groups] += 50
        assert_same_as_torch_topk(PATHS[path](matrix, 32), matrix, 32)


@pytest.mark.parametrize("path", PATHS)
def test_ties_and_masked_columns_give_torch_topk_values(path):
    select = PATHS[path]
    generator = torch.Generator().manual_seed(2)
    rounded = torch.randint(0, 5, (16, 4096), generator=generator).float()  # massive ties
    assert_same_as_torch_topk(select(rounded, 32), rounded, 32)
    constant = torch.full((4, 4096), 0.25)  # every entry ties: the kernel's buffer overflows
    assert_same_as_torch_topk(select(constant, 32), constant, 32)
    masked = torch.randn(16, 4096, generator=generator)
    masked[:, 20:] = float("-inf")  # fewer finite entries than k: -inf fills in, as in torch.topk
    assert_same_as_torch_topk(select(masked, 32), masked, 32)
    masked[:, :] = float("-inf")
    masked[:, 3] = 1.0
    assert_same_as_torch_topk(select(masked, 32), masked, 32)
    groups = native_group_count(4096, 32)  # 128: the kernel's group g holds columns g, g + 128, ...
    for masked_groups in (90, 110):  # whole groups at -inf (AuxK's mask); 110 leaves fewer than k groups
        grouped = torch.randn(16, 4096, generator=generator)
        grouped[:, torch.arange(4096) % groups < masked_groups] = float("-inf")
        assert_same_as_torch_topk(select(grouped, 32), grouped, 32)
    infinite = torch.randn(16, 4096, generator=generator)
    infinite[::2, 100:140] = float("inf")
    assert_same_as_torch_topk(select(infinite, 32), infinite, 32)
    extreme = torch.randn(16, 4096, generator=generator) * 3e38  # bisection midpoints near overflow
    assert_same_as_torch_topk(select(extreme, 32), extreme, 32)


def test_a_nan_hands_the_matrix_to_torch_topk():
    matrix = torch.randn(40, 4096, generator=torch.Generator().manual_seed(4))
    matrix[17, 2049] = float("nan")
    values, indices = by_native(matrix, 32)
    assert torch.isnan(values[17]).sum() == 1 and 2049 in indices[17].tolist()  # NaN ranks first, as in torch
    assert_same_as_torch_topk(Selection(values, indices), matrix, 32)


def test_small_or_odd_shapes_fall_back_to_torch_topk():
    assert group_size(64, 6) == 0 and group_size(4097, 32) == 0 and group_size(4096, 256) == 0
    assert native_group_count(40, 6) == 0 and native_group_count(4096, 1024) == 0
    generator = torch.Generator().manual_seed(3)
    for width, k in ((64, 6), (40, 6), (4097, 32), (4096, 256), (100, 100), (4096, 1024)):
        matrix = torch.randn(32, width, generator=generator)
        assert_same_as_torch_topk(topk_rows(matrix, k), matrix, k)
    transposed = torch.randn(4096, 64, generator=generator).t()  # not contiguous
    assert_same_as_torch_topk(topk_rows(transposed, 32), transposed, 32)
    double = torch.randn(32, 4096, dtype=torch.float64, generator=generator)
    assert_same_as_torch_topk(topk_rows(double, 32), double, 32)


def test_kernel_is_built_once_then_taken_from_the_cache(tmp_path, monkeypatch):
    require_c_compiler()
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    first = native.build("topk_rows")
    built_at = first.stat().st_mtime_ns
    assert native.build("topk_rows") == first and first.stat().st_mtime_ns == built_at
    assert [path.name for path in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_without_a_compiler_or_when_disabled_the_pytorch_path_serves(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-lexica")
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lexica.train.native"):
            assert native.load("topk_rows") is None
        assert "no C compiler found" in caplog.text and "PyTorch path" in caplog.text
        monkeypatch.delenv("CC")
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        native.load.cache_clear()
        assert native.load("topk_rows") is None
        assert list(tmp_path.iterdir()) == []
    finally:
        native.load.cache_clear()


def test_a_build_error_names_the_kernel_and_the_compiler_message(tmp_path, monkeypatch):
    require_c_compiler()
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "broken.c").write_text("int f(void) { return missing_symbol; }\n")
    monkeypatch.setattr(native, "KERNELS", kernels)
    with pytest.raises(RuntimeError, match=r"broken\.c.*missing_symbol"):
        native.build("broken")
    assert not any(path.suffix == ".so" for path in (tmp_path / "cache").iterdir())
