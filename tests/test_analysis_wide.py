"""``lexica analysis features`` on a 2^20-latent dictionary on this machine: the statistics,
contexts and logit-effect tables are complete and right, and the pass's memory stays bounded
(encoding runs in row chunks within the budget; no table is held as per-feature Python objects).
The neighbour search, the map and the site at that width are measured by bench/geometry.py and
bench/site_build.py (minutes each here), so this test skips them."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import sample_texts, write_jsonl
from test_analysis_features import harvest

from lexica.train.config import TrainConfig
from lexica.train.fit import fit

WIDTH = 2**20


@pytest.mark.slow
def test_the_atlas_tables_of_a_million_feature_dictionary(tiny_models, tmp_path):
    # ~1,000 tokens: at 2^20 latents each pass over them (the training's density, statistics,
    # contexts) costs seconds per hundred tokens here, and two batches of 512 still show chunking.
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(10, seed=4))
    run = tmp_path / "run"
    store_url = harvest(run, tiny_models["llama"], corpus, "resid_post.1")
    summary = fit(TrainConfig(run=str(run), store=store_url, architecture="topk", width=str(WIDTH), k=4,
                              batch_size=256, tokens=2 * 256, workers=0, buffer_rows=1024, eval_tokens=0))
    command = [sys.executable, "-m", "lexica", "analysis", "features", "--run", str(run), "--workers", "0",
               "--set", "map=false", "--set", "site=false", "--set", "neighbours=0", "--set", "top_examples=5",
               "--set", "samples=8",
               "--set", "window_before=4", "--set", "window_after=2", "--set", "batch_rows=512"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    folder = run / "analysis" / summary["name"]
    atlas = json.loads((folder / "summary.json").read_text())
    assert atlas["d_sae"] == WIDTH
    features = pq.read_table(folder / "features.parquet", columns=["feature", "fires"])
    assert features.num_rows == WIDTH and features.column("feature").to_pylist()[-1] == WIDTH - 1
    assert sum(features.column("fires").to_pylist()) == atlas["tokens"] * 4  # TopK: k latents per token
    logits = pq.read_table(folder / "logits.parquet", columns=["feature", "promoted_tokens"])
    assert logits.num_rows == WIDTH and all(len(tokens) == 10 for tokens in logits.column("promoted_tokens")
                                            .to_pylist()[:: WIDTH // 64])
    contexts = pq.read_table(folder / "contexts.parquet", columns=["feature"])
    fired = {feature for feature, fires in zip(*features.to_pydict().values(), strict=True) if fires}
    assert set(contexts.column("feature").to_pylist()) == fired
    # The dictionary itself is 2 x 2^20 x 64 floats (0.5 GB); every table is per feature, none per
    # token x feature: the whole pass stays within a few GB (a peak that grew with batch x latents
    # would be 4 GB for the encoder's pre-activations alone).
    print(f"analysis features at {WIDTH:,} latents: peak RSS {peak_gb:.2f} GB")
    assert before <= peak_gb * 2**20 and peak_gb < 6, f"peak RSS {peak_gb:.1f} GB"

    # Steering and monitoring encode through the same chunked path: a feature past 2^19 and the
    # one that fired most, clamped and watched.
    by_fires = sorted(fired, key=lambda feature: -features.column("fires")[feature].as_py())
    densest, last = by_fires[0], max(fired)
    steered = subprocess.run([sys.executable, "-m", "lexica", "steer", "--run", str(run), "--feature", str(densest),
                              "--value", "3x", "--prompt", "the model reads", "--json", "--max-new-tokens", "6"],
                             capture_output=True, text=True, timeout=600)
    assert steered.returncode == 0, steered.stderr[-2000:]
    document = json.loads(steered.stdout)
    maximum = pq.read_table(folder / "features.parquet", columns=["max_activation"]).column(0)[densest].as_py()
    assert document["features"][0]["feature"] == densest
    assert document["features"][0]["activation"] == pytest.approx(3 * maximum, rel=1e-4)
    assert len(document["steered"]["token_ids"]) == 6
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sample_texts(10, seed=4)[:3]) + "\n")  # texts the atlas saw: they fire
    watched = subprocess.run([sys.executable, "-m", "lexica", "monitor", "--run", str(run), "--watch",
                              ",".join(map(str, [*by_fires[:8], last])), "--texts", str(texts), "--json",
                              "--set", "threshold=0.000001"],
                             capture_output=True, text=True, timeout=600)
    assert watched.returncode == 0, watched.stderr[-2000:]
    reports = [json.loads(line) for line in watched.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 3 and any(report["flagged"] for report in reports)
