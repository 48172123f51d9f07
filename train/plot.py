"""``lexica plot FOLDER``: draw a dictionary's training curves and feature-density histogram to a PNG.

Reads ``metrics.jsonl`` (one JSON object per logged step) and, when the loop wrote it,
``feature_density.json`` (each latent's firing frequency, measured on a store sample after training).
"""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
from matplotlib.figure import Figure

from lexica import storage
from lexica.errors import LexicaError

# Each panel: title, the metric keys it draws, whether its y axis is logarithmic. Every numeric key
# not named here is taken for a loss term, so a new architecture's terms appear without edits.
PANELS = [
    ("L0 (active latents per token)", ["l0"], False),
    ("dead & dense latents, data wait (fractions)", ["dead_fraction", "dense_fraction", "data_wait_fraction"], False),
    ("learning rate", ["lr"], False),
    ("tokens per second", ["tokens_per_second"], False),
]
AXIS_KEYS = {"step", "tokens"}
DENSE_FREQUENCY = 0.1  # the loop counts a latent as dense above this firing frequency


class PlotError(LexicaError, ValueError):
    """The dictionary folder's metrics cannot be read."""


def read_metrics(fs, path: str, url: str) -> list[dict]:
    if not storage.exists(fs, path):
        raise PlotError(f"{url} not found; give a dictionary folder (<run>/dictionaries/<name>)")
    with fs.open(path, "rb") as handle:
        lines = handle.read().decode().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(f"{url} line {number} is not valid JSON ({error.msg}): {line[:80]!r}") from error
        if not isinstance(record, dict):
            raise PlotError(f"{url} line {number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    if not records:
        raise PlotError(f"{url} has no metrics yet")
    return records


def read_density(fs, path: str, url: str) -> np.ndarray | None:
    if not storage.exists(fs, path):
        return None
    with fs.open(path, "rb") as handle:
        raw = handle.read()
    try:
        frequencies = np.asarray(json.loads(raw), dtype=float)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise PlotError(f"{url} is not a JSON list of firing frequencies ({error})") from error
    if frequencies.ndim != 1:
        raise PlotError(f"{url} is not a flat JSON list of firing frequencies (shape {frequencies.shape})")
    return frequencies


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def draw_series(axes, records: list[dict], x_key: str, keys: list[str], log: bool) -> None:
    for key in keys:
        points = [(record[x_key], record[key]) for record in records
                  if is_number(record.get(key)) and is_number(record.get(x_key))]
        # A log axis cannot show zeros (AuxK is 0 while nothing is dead), NaN or infinities.
        points = [(x, y) for x, y in points if math.isfinite(y) and (y > 0 or not log)]
        if not points:
            axes.plot([], [], label=f"{key} (nothing {'> 0' if log else 'numeric'} to draw)")
            continue
        xs, ys = zip(*points, strict=True)
        # A lone point draws no line, so mark it.
        axes.plot(xs, ys, label=key, marker="." if len(xs) == 1 else None)
    if log:
        axes.set_yscale("log")
    axes.set_xlabel(x_key)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def draw_density(axes, frequencies: np.ndarray) -> None:
    firing = frequencies[frequencies > 0]
    silent = len(frequencies) - len(firing)
    if len(firing):
        axes.hist(np.log10(firing), bins=50)
    axes.axvline(math.log10(DENSE_FREQUENCY), color="tab:red", linestyle="--", label=f"dense (> {DENSE_FREQUENCY})")
    axes.set_title(f"feature density: {len(frequencies)} latents, {silent} never fired in the sample")
    axes.set_xlabel("log10 firing frequency (per token)")
    axes.set_ylabel("latents")
    axes.legend(fontsize="small")


def plot_training(folder_url: str, out_url: str | None = None, storage_options: dict | None = None) -> str:
    """Render ``<folder>/metrics.jsonl`` (and ``feature_density.json`` if present) to a PNG; return its URL."""
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    records = read_metrics(fs, storage.join(folder, "metrics.jsonl"), storage.join(folder_url, "metrics.jsonl"))
    frequencies = read_density(fs, storage.join(folder, "feature_density.json"),
                               storage.join(folder_url, "feature_density.json"))

    x_key = "tokens" if all(is_number(record.get("tokens")) for record in records) else "step"
    present = {key for record in records for key, value in record.items() if is_number(value)}
    named = {key for _, keys, _ in PANELS for key in keys}
    # First-seen order keeps "loss" ahead of its terms, as the loop writes them.
    loss_keys = [key for key in dict.fromkeys(key for record in records for key in record)
                 if key in present and key not in named | AXIS_KEYS]
    panels = [("loss terms", loss_keys, True)] if loss_keys else []
    panels += [(title, [key for key in keys if key in present], log) for title, keys, log in PANELS
               if any(key in present for key in keys)]

    cells = len(panels) + (frequencies is not None)
    rows = max(1, math.ceil(cells / 2))
    figure = Figure(figsize=(12, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, 2, squeeze=False).flatten()
    for axes, (title, keys, log) in zip(grid[:len(panels)], panels, strict=True):
        draw_series(axes, records, x_key, keys, log)
        axes.set_title(title)
    if frequencies is not None:
        draw_density(grid[len(panels)], frequencies)
    for axes in grid[cells:]:
        axes.set_axis_off()
    note = "" if frequencies is not None else "  (no feature_density.json: density histogram not drawn)"
    figure.suptitle(f"{folder_url}: {len(records)} logged steps{note}", fontsize="medium")

    # Figure renders with Agg without pyplot, so no global backend or display is touched.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    out_url = out_url or storage.join(folder_url, "training.png")
    out_fs, out_path = storage.url_to_fs(out_url, storage_options)
    storage.write_bytes(out_fs, out_path, buffer.getvalue())
    return out_url


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexica plot",
                                     description="Draw a dictionary's training curves and feature density.")
    parser.add_argument("folder", metavar="DICTIONARY_FOLDER_URL", help="<run>/dictionaries/<name> (local or s3://)")
    parser.add_argument("--out", help="PNG to write (default: <folder>/training.png)")
    args = parser.parse_args(argv)
    print(plot_training(args.folder, args.out))
    return 0
