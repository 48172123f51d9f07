"""``lexica plot`` turns a dictionary folder's metrics into a PNG, locally and on S3, and
names the file (and line) when the metrics cannot be read."""

from __future__ import annotations

import json
from pathlib import Path

import s3fs
from matplotlib.image import imread

from lexica.cli import main
from lexica.train.plot import plot_training

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_lines(steps: int = 5) -> list[str]:
    # The keys the loop writes; AuxK is 0 while nothing is dead, which a log axis must survive.
    return [json.dumps({"step": step, "tokens": step * 256, "loss": 1.0 / step, "fvu": 0.9 / step,
                        "auxk": 0.0 if step < 3 else 0.1, "l0": 32.0, "dead_fraction": 0.01 * step,
                        "dense_fraction": 0.0, "lr": 1e-3, "tokens_per_second": 5000.0 + step})
            for step in range(1, steps + 1)]


def write_folder(folder: Path, lines: list[str], density: list[float] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if density is not None:
        (folder / "feature_density.json").write_text(json.dumps(density))
    return folder


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0


def test_plot_writes_training_png_next_to_the_metrics(tmp_path, capsys):
    folder = write_folder(tmp_path / "dictionaries" / "topk", metrics_lines(), density=[0.0, 1e-4, 0.003, 0.2] * 8)
    assert main(["plot", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "training.png")
    assert_png(folder / "training.png")


def test_plot_without_density_draws_curves_to_the_given_file(tmp_path):
    folder = write_folder(tmp_path / "dictionary", metrics_lines(steps=1))
    out = tmp_path / "elsewhere" / "curves.png"
    assert main(["plot", str(folder), "--out", str(out)]) == 0
    assert_png(out)
    assert not (folder / "training.png").exists()


def test_missing_metrics_names_the_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and str(tmp_path / "metrics.jsonl") in message


def test_malformed_line_names_its_number(tmp_path, capsys):
    lines = metrics_lines()
    lines[2] = '{"step": 3, "loss": 0.3'  # a line cut short
    folder = write_folder(tmp_path, lines)
    assert main(["plot", str(folder)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "metrics.jsonl line 3 " in message
    assert not (folder / "training.png").exists()


def test_plot_reads_and_writes_s3(s3_server, tmp_path):
    endpoint, options = s3_server
    remote = s3fs.S3FileSystem(endpoint_url=endpoint)
    remote.pipe("lexica-test/runs/plot/dictionaries/topk/metrics.jsonl", ("\n".join(metrics_lines()) + "\n").encode())
    folder_url = "s3://lexica-test/runs/plot/dictionaries/topk"
    assert plot_training(folder_url, storage_options=options) == folder_url + "/training.png"
    local = tmp_path / "training.png"
    local.write_bytes(remote.cat("lexica-test/runs/plot/dictionaries/topk/training.png"))
    assert_png(local)
