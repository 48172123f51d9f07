"""Training batches: lanes split the store between workers without changing the global batches."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_train_topk import write_synthetic_store

from lexica.store import ActivationStore, StoreError
from lexica.train.data import shuffled_batches


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    ids = torch.arange(6000)
    vectors = torch.zeros(6000, 8)
    vectors[:, 0], vectors[:, 1] = ids // 64, ids % 64  # every row distinct, exactly, in float16
    return ActivationStore(write_synthetic_store(str(tmp_path_factory.mktemp("lanes") / "run"), vectors, shards=6))


def take(iterator, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(iterator, count))


def test_lanes_read_disjoint_parts_and_add_up_to_the_global_batches(store):
    def stream(**lanes):
        return shuffled_batches(store, batch_size=200, buffer_rows=1000, seed=3, scale=1.0, **lanes)

    whole = take(stream(lanes=2), 25)
    first, second = take(stream(lanes=2, lane_ids=[0]), 25), take(stream(lanes=2, lane_ids=[1]), 25)
    for batch, a, b in zip(whole, first, second, strict=True):
        assert torch.equal(batch, torch.cat([a, b]))
    # Within the first epoch (3000 rows per lane) the lanes share no row: each reads its own parts.
    rows_a = {tuple(row.tolist()) for row in torch.cat(first[:15])}
    rows_b = {tuple(row.tolist()) for row in torch.cat(second[:15])}
    assert len(rows_a) == len(rows_b) == 1500 and not rows_a & rows_b
    # A resumed stream continues the same sequence.
    assert all(torch.equal(x, y) for x, y in zip(take(stream(lanes=2, skip_batches=7), 5), whole[7:12], strict=True))


def test_more_lanes_than_parts_or_an_uneven_split_is_refused(store):
    with pytest.raises(StoreError, match="has 6 committed parts, fewer than the 7 data lanes"):
        next(shuffled_batches(store, batch_size=700, buffer_rows=1000, seed=0, scale=1.0, lanes=7))
    with pytest.raises(ValueError, match="batch_size 201 is not a multiple of the 2 data lanes"):
        next(shuffled_batches(store, batch_size=201, buffer_rows=1000, seed=0, scale=1.0, lanes=2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_activation_is_caught_with_its_shard(tmp_path, bad):
    """The check is a min/max pass over each read: a single NaN, +inf or -inf anywhere is caught."""
    vectors = torch.randn(3000, 8, generator=torch.Generator().manual_seed(5))
    vectors[2345, 6] = bad  # shard 1 of 2
    url = write_synthetic_store(str(tmp_path / "run"), vectors, shards=2)
    store = ActivationStore(url)
    with pytest.raises(StoreError, match=r"shard 1 \(part shard-000001-.*\) .* NaN or infinite"):
        take(shuffled_batches(store, batch_size=100, buffer_rows=500, seed=0, scale=1.0), 40)


def test_prefetcher_yields_the_same_batches_then_the_source_error():
    import sys

    from lexica.train.data import SWITCH_INTERVAL_SECONDS, Prefetcher

    previous = sys.getswitchinterval()
    try:
        def source():
            yield from (torch.full((2, 3), float(i)) for i in range(5))
            raise StoreError("part 7 is damaged")

        prefetched = Prefetcher(source(), depth=2)
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
        for i in range(5):
            assert torch.equal(next(prefetched), torch.full((2, 3), float(i)))
        with pytest.raises(StoreError, match="part 7 is damaged"):
            next(prefetched)
        assert prefetched.calls == 6
        endless = Prefetcher(itertools.repeat(torch.zeros(1)), depth=2)
        next(endless)
        endless.close()
        endless._thread.join(timeout=5)
        assert not endless._thread.is_alive()
    finally:
        sys.setswitchinterval(previous)
