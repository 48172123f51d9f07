"""Bad training input gets one clear error naming the store, part or URL, and nothing is lost."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_train_topk import ground_truth, synthetic, write_synthetic_store

from lexica.storage import StorageError
from lexica.store import StoreError
from lexica.train.config import TrainConfig
from lexica.train.fit import fit


def small_config(run: Path, store: str, **overrides) -> TrainConfig:
    values = {"run": str(run), "store": store, "width": "2x", "k": 4, "batch_size": 256, "buffer_rows": 1024,
              "workers": 0, "eval_tokens": 0, "log_every": 5}
    return TrainConfig(**{**values, **overrides})


@pytest.fixture
def store(tmp_path) -> tuple[Path, str]:
    vectors = synthetic(3000, ground_truth(), torch.Generator().manual_seed(9))
    url = write_synthetic_store(str(tmp_path / "run"), vectors, shards=3)
    return Path(url), url


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, **changes}))


def test_manifest_that_mismatches_its_parts_is_refused_naming_the_part(tmp_path, store):
    folder, url = store
    edit_manifest(folder, dtype="bfloat16")  # same row width as the float16 parts: only metadata tells
    with pytest.raises(StoreError, match=r"part shard-\d+-\S+ of shard \d .* holds dtype float16 but the "
                                         r"manifest says bfloat16"):
        fit(small_config(tmp_path / "run", url))
    edit_manifest(folder, dtype="float16", d_model=48)
    with pytest.raises(StoreError, match=r"holds d_model 64 but the manifest says 48"):
        fit(small_config(tmp_path / "run", url, width="96"))


def test_a_store_without_committed_rows_is_refused(tmp_path, store):
    folder, url = store
    shutil.rmtree(folder / "commits")
    (folder / "commits").mkdir()
    with pytest.raises(StoreError, match=rf"store {re.escape(url)} has no committed rows to train on"):
        fit(small_config(tmp_path / "run", url))


def test_an_uncommitted_part_is_never_read(tmp_path, store):
    folder, url = store
    clean = fit(small_config(tmp_path / "clean", url, tokens=2048))["dictionary"].state_dict()
    # A part left by a crashed harvest attempt, without a commit record, full of NaN.
    poisoned = synthetic(1000, ground_truth(), torch.Generator().manual_seed(10))
    poisoned[:] = float("nan")
    stray = write_synthetic_store(str(tmp_path / "stray"), poisoned, shards=1)
    for part in (Path(stray) / "parts").iterdir():
        shutil.copy(part, folder / "parts" / part.name.replace("shard-000000", "shard-000001"))
    again = fit(small_config(tmp_path / "again", url, tokens=2048))["dictionary"].state_dict()
    for name, tensor in clean.items():
        torch.testing.assert_close(again[name], tensor, msg=name)


def test_unwritable_run_url_is_named_before_training(tmp_path, store):
    _, url = store
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for run in (blocker / "run", Path("/proc/lexica-cannot-write-here")):
        with pytest.raises(StorageError, match=rf"cannot write to {re.escape(str(run))}/dictionaries/"):
            fit(small_config(run, url))
    assert blocker.read_text() == "not a folder"


def test_unknown_or_missing_tracker_is_named_before_training(tmp_path, store):
    from lexica.config import ConfigError

    _, url = store
    with pytest.raises(ConfigError, match="unknown tracker 'tensorboardx'; available: mlflow"):
        fit(small_config(tmp_path / "run", url, trackers=["tensorboardx"]))
