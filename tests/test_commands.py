"""One package, one command: the `lexica` command and its exit codes, damaged inputs as one-line
errors, typed architecture options, the run that `train` writes into, and imports that run one way."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train_topk import write_synthetic_store

from lexica.cli import COMMANDS
from lexica.cli import main as lexica_main
from lexica.errors import EXIT_BAD_INPUT
from lexica.run import EXPORTED_AT_KEY, Run
from lexica.train.architectures import build
from lexica.train.export import export_dictionary

ROOT = Path(__file__).resolve().parent.parent
LEXICA = Path(sys.executable).parent / "lexica"  # the console script of this environment


def one_line_error(stderr: str) -> str:
    """The one ``error:`` line of a failed command (progress and log lines may precede it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), f"not one error line at the end:\n{stderr}"
    assert "Traceback" not in stderr
    return errors[0]


def test_the_command_is_lexicas_even_beside_a_users_own_stage_files(tmp_path):
    for name in ("train", "harvest", "analysis", "lexica"):
        (tmp_path / f"{name}.py").write_text("print('THE USER FILE RAN')\n")
    assert LEXICA.exists(), "the lexica console script is not installed (pip install -e .)"
    for arguments in (["--help"], ["train", "--help"], ["harvest", "--help"], ["analysis", "--help"]):
        result = subprocess.run([str(LEXICA), *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "THE USER FILE RAN" not in result.stdout + result.stderr
        assert "usage: lexica" in result.stdout
    # Nothing is installed under a generic top-level name.
    for generic in ("harvest", "train", "analysis", "deploy"):
        found = subprocess.run([sys.executable, "-c", f"import importlib.util as u; print(u.find_spec('{generic}'))"],
                               cwd=tmp_path / "..", capture_output=True, text=True).stdout.strip()
        assert found == "None", f"'{generic}' is importable outside the checkout: {found}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command, capsys):
    arguments = [command, "features", "--help"] if command == "analysis" else [command, "--help"]
    with pytest.raises(SystemExit) as stop:
        lexica_main(arguments)
    assert stop.value.code == 0
    assert "usage: lexica" in capsys.readouterr().out


def test_usage_and_unknown_commands(capsys):
    assert lexica_main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in COMMANDS)
    assert lexica_main(["harvset"]) == EXIT_BAD_INPUT
    assert "unknown command 'harvset'" in capsys.readouterr().err
    assert lexica_main(["--version"]) == 0 and capsys.readouterr().out.startswith("lexica ")


def test_a_truncated_model_weights_file_is_a_one_line_error(tiny_models, small_corpus, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for item in Path(tiny_models["llama"]).iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([str(LEXICA), "harvest", "--model", str(model), "--corpus", str(small_corpus),
                             "--run", str(tmp_path / "run"), "--actors", "0"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == EXIT_BAD_INPUT
    line = one_line_error(result.stderr)
    assert str(model) in line and "damaged or truncated" in line


def exported_run(tmp_path: Path, names: tuple[str, ...] = ("topk-a",)) -> Path:
    """A run with a synthetic store and, per name, an exported (untrained) TopK dictionary."""
    run = tmp_path / "run"
    store = write_synthetic_store(str(run), torch.randn(256, 16), shards=1)
    for name in names:
        export_dictionary(build("topk", d_in=16, d_sae=32, k=4), 1.0, str(run / "dictionaries" / name / "final"),
                          {"lexica_store": store, "hook": "resid_post.0", "model": {"id": "synthetic"}})
    return run


def test_a_truncated_dictionary_weights_file_is_a_one_line_error(tmp_path, capsys):
    run = exported_run(tmp_path)
    weights = run / "dictionaries" / "topk-a" / "final" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert lexica_main(["analysis", "features", "--run", str(run), "--workers", "0"]) == EXIT_BAD_INPUT
    line = one_line_error(capsys.readouterr().err)
    assert "sae_weights.safetensors is damaged or truncated" in line
    assert lexica_main(["steer", "--run", str(run), "--feature", "1", "--value", "2", "--prompt", "x"]) == 2
    assert "sae_weights.safetensors is damaged or truncated" in one_line_error(capsys.readouterr().err)


def test_a_misspelt_architecture_option_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    store = write_synthetic_store(str(run), torch.randn(512, 16), shards=1)
    (run / "run.yaml").write_text(yaml.safe_dump({"harvest": {"hook": "resid_post.0"}}))
    before = (run / "run.yaml").read_text()
    code = lexica_main(["train", "--store", store, "--arch", "jumprelu", "--width", "2x", "--workers", "0",
                        "--set", "extra={l0_coeficient: 0.01}"])
    assert code == EXIT_BAD_INPUT
    line = one_line_error(capsys.readouterr().err)
    assert "unknown key(s) ['l0_coeficient']" in line and "l0_coefficient" in line
    # With the worker defaults left to size, the config is still refused before any cluster starts.
    def no_cluster(*args, **kwargs):
        raise AssertionError("a Ray cluster was started for a config that is refused")

    monkeypatch.setattr("lexica.cluster.cluster_resources", no_cluster)
    code = lexica_main(["train", "--store", store, "--arch", "relu", "--set", "extra={sparsity_warmup: 2}"])
    assert code == EXIT_BAD_INPUT
    assert "train.extra.sparsity_warmup = 2 is invalid for relu; expected 0..1" in capsys.readouterr().err
    assert (run / "run.yaml").read_text() == before
    assert not (run / "dictionaries").exists()


def test_train_with_only_a_store_writes_into_the_run_that_holds_it(ray_cluster, tmp_path, monkeypatch):
    run = tmp_path / "run"
    store = write_synthetic_store(str(run), torch.randn(2048, 16), shards=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The issue's own command line (two DDP workers through Ray Train), plus a short run.
    assert lexica_main(["train", "--store", store, "--arch", "topk", "--width", "8x", "--k", "32", "--workers", "2",
                        "--batch-size", "256", "--set", "eval_tokens=0", "--set", "buffer_rows=512"]) == 0
    assert (run / "dictionaries" / "topk-resid_post.0-8x-k32" / "final" / "cfg.json").is_file()
    assert list(elsewhere.iterdir()) == []
    recorded = yaml.safe_load((run / "run.yaml").read_text())["train"]
    cluster_cpus = int(ray_cluster.cluster_resources()["CPU"])  # whichever local Ray this session started
    assert recorded["run"] == str(run) and recorded["workers"] == 2
    assert recorded["cpus_per_worker"] == max(1, cluster_cpus // 2)  # the CPUs shared among the workers
    assert Run(str(run)).model() == {"id": "synthetic"}


def test_the_newest_dictionary_is_the_latest_export_on_every_filesystem(tmp_path):
    run = exported_run(tmp_path, ("z-first", "a-second"))
    assert Run(str(run)).dictionary_names() == ["z-first", "a-second"]  # export order, not names
    assert Run(str(run)).dictionary_name() == "a-second"
    # The same rule on an object store (fsspec's in-memory filesystem; no file times there).
    memory = Run("memory://lexica-newest")
    for name, exported_at in (("b", "2026-01-02T00:00:00+00:00"), ("c", "2026-01-01T00:00:00+00:00")):
        memory.fs.pipe(f"{memory.root}/dictionaries/{name}/final/cfg.json",
                       json.dumps({"metadata": {EXPORTED_AT_KEY: exported_at}}).encode())
    assert memory.dictionary_name() == "b"


# ---------------------------------------------------------------- the import graph

STAGE_OF_FOLDER = {"harvest": "lexica.harvest", "train": "lexica.train", "analysis": "lexica.analysis",
                   "deploy": "lexica.deploy"}
LAYERS = ["core", "lexica.harvest", "lexica.train", "lexica.analysis", "lexica.deploy", "top"]
TOP = {"lexica", "lexica.api", "lexica.cli", "lexica.reference", "lexica.__main__"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] in STAGE_OF_FOLDER:
        parts = [*STAGE_OF_FOLDER[parts[0]].split("."), *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int:
    if module in TOP:
        return LAYERS.index("top")
    for index, prefix in enumerate(LAYERS[1:5], start=1):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return LAYERS.index("core")


def lexica_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lexica"):
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                      if (ROOT / "lexica" / f"{alias.name}.py").exists() and node.module == "lexica"]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("lexica")]
    return found


def test_imports_run_one_way():
    """The core imports no stage; a stage imports the core and lower stages only."""
    folders = ["lexica", *STAGE_OF_FOLDER]
    files = [path for folder in folders for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 60
    upward = []
    for path in files:
        importer = module_name(path)
        for imported in lexica_imports(path):
            if imported == "lexica":
                continue
            if layer(imported) > layer(importer):
                upward.append(f"{path.relative_to(ROOT)} ({LAYERS[layer(importer)]}) imports {imported}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)
    # No module outside lexica/ may still import a stage by its old top-level name.
    for path in [*files, *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"),
                 *(ROOT / "scripts").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert name.split(".")[0] not in STAGE_OF_FOLDER, f"{path.relative_to(ROOT)} imports {name}"


def test_the_train_stage_imports_run_one_way_inside():
    order = ["step", "plan", "metrics", "worker", "job", "fit", "cli"]
    for position, name in enumerate(order):
        later = {f"lexica.train.{other}" for other in order[position + 1:]}
        imported = set(lexica_imports(ROOT / "train" / f"{name}.py"))
        assert not imported & later, f"train/{name}.py imports {imported & later}"


# ---------------------------------------------------------------- defaults sized to the machine


def test_training_defaults_are_sized_to_the_cluster():
    from lexica.train.config import TrainConfig, sized_for

    def sized(resources: dict, **knobs) -> tuple:
        config = sized_for(TrainConfig(**knobs), resources)
        return config.workers, config.cpus_per_worker

    assert sized({"CPU": 2, "GPU": 0}) == (1, 2.0)  # this machine: one worker using both cores
    assert sized({"CPU": 16, "GPU": 4}) == (4, 4.0)  # one worker per GPU, the CPUs shared
    assert sized({"CPU": 16, "GPU": 4}, device="cpu") == (1, 16.0)
    assert sized({"CPU": 16, "GPU": 4}, workers=2) == (2, 8.0)
    assert sized({"CPU": 16, "GPU": 4}, workers=0, cpus_per_worker=3.0) == (0, 3.0)  # given values stay


def test_analysis_defaults_are_sized_to_the_cluster():
    from lexica.analysis.config import AnalysisConfig

    assert AnalysisConfig().sized_for({"CPU": 2, "GPU": 0}).workers == 2
    assert AnalysisConfig(cpus_per_worker=2.0).sized_for({"CPU": 8, "GPU": 0}).workers == 4
    assert AnalysisConfig().sized_for({"CPU": 8, "GPU": 2}).workers == 2
    assert AnalysisConfig(workers=0).sized_for({"CPU": 8, "GPU": 2}).workers == 0


def test_help_says_what_the_defaults_come_to_here(capsys):
    with pytest.raises(SystemExit):
        lexica_main(["train", "--help"])
    assert f"with this machine's {os.cpu_count()} CPUs" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- progress


def test_progress_is_a_live_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    import io

    from lexica.progress import Progress

    for mode in ("bar", "lines"):
        monkeypatch.setenv("LEXICA_PROGRESS", mode)
        stream = io.StringIO()
        progress = Progress("train", 4, "steps", interval=0.0, stream=stream)
        for step in range(1, 5):
            progress.update(step, step * 100, "fvu 0.5 | details", final=step == 4)
        progress.update(4, 400, final=True)  # after the final update: nothing more
        written = stream.getvalue()
        if mode == "bar":
            assert "\r" in written and "4/4" in written and "fvu 0.5" in written and "details" not in written
        else:
            lines = written.splitlines()
            assert len(lines) == 4 and lines[-1].startswith("[train] steps 4/4 tokens 400")
            assert lines[-1].endswith("| fvu 0.5 | details")


def test_steer_and_monitor_take_a_config_and_set(tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run": str(tmp_path / "run"), "monitor": {"threshold": 2.5}}))
    texts = tmp_path / "texts.txt"
    texts.write_text("a text\n")
    assert lexica_main(["steer", "--feature", "1", "--value", "2", "--prompt", "x"]) == EXIT_BAD_INPUT
    assert "steer needs a run folder: --run URL" in one_line_error(capsys.readouterr().err)
    assert lexica_main(["monitor", "--config", str(config), "--watch", "1", "--texts", "-",
                        "--set", "top=0"]) == EXIT_BAD_INPUT
    assert "monitor.top = 0 is invalid; expected >= 1" in one_line_error(capsys.readouterr().err)
    # The config's run and section reach the command: it gets as far as looking for a dictionary.
    assert lexica_main(["monitor", "--config", str(config), "--watch", "1", "--texts", str(texts)]) == EXIT_BAD_INPUT
    assert f"{tmp_path / 'run'} has no exported dictionary" in one_line_error(capsys.readouterr().err)
