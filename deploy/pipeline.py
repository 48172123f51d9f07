"""``lexica pipeline``: harvest → train → analysis features in one driver process.

The entrypoint of a submitted pipeline job (``deploy/submit.py``); it runs the same way on a
laptop. Each stage is its own CLI's ``main`` called with the same config, so a stage behaves here
exactly as ``lexica STAGE --config FILE`` does, and the stages share one Ray connection
(``lexica.cluster.ensure_ray`` connects to ``RAY_ADDRESS``, which Ray sets for a job's driver).
The first stage that fails stops the pipeline, and its exit code becomes the pipeline's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple, TextIO

from lexica.command import run_main
from lexica.errors import LexicaError

STAGES = ("harvest", "train", "analysis")
# The submitter ships the config's text inside the job, so a config outside the uploaded working
# directory (or under an excluded folder such as runs/) still reaches the cluster.
CONFIG_TEXT_ENV = "LEXICA_PIPELINE_CONFIG"
CONFIG_SOURCE_ENV = "LEXICA_PIPELINE_CONFIG_SOURCE"
# Ray sets this for the driver of a submitted job (its runtime environment and metadata).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
DEFAULT_RUN = "./runs/demo"  # every stage's default ``run``


class StageResult(NamedTuple):
    stage: str
    exit_code: int
    seconds: float


class PipelineError(LexicaError, ValueError):
    """The pipeline cannot start: bad stages, a missing config, a run folder no cluster node can share."""


def parse_stages(text: str) -> list[str]:
    """``"train,harvest"`` → ``["harvest", "train"]``: stages always run in pipeline order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise PipelineError(f"unknown stage(s) {unknown or [text]}; choose from {','.join(STAGES)}")
    return [stage for stage in STAGES if stage in names]


def stage_argv(stage: str, config_path: str, run_url: str | None) -> list[str]:
    """The command line each stage's ``main`` gets: the shared config, and the run folder when overridden."""
    overrides = ["--set", f"run={run_url}"] if run_url else []
    subcommand = ["features"] if stage == "analysis" else []
    return [*subcommand, "--config", config_path, *overrides]


def stage_main(stage: str) -> Callable[[list[str]], int]:
    # Imported when the stage starts, so a pipeline of one stage never imports the others.
    if stage == "harvest":
        from lexica.harvest.cli import main
    elif stage == "train":
        from lexica.train.cli import main
    else:
        from lexica.analysis.cli import main
    return main


def run_stage(stage: str, argv: list[str]) -> int:
    """Run one stage's CLI; an exception or ``sys.exit`` becomes an exit code, never a crash of the pipeline."""
    try:
        code = run_main(stage_main(stage), argv)
    except SystemExit as stop:  # argparse and the stages' own exits
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)
        print(stop.code, file=sys.stderr)
        return 1
    except Exception:  # an unexpected error: keep the traceback, it is the only clue
        traceback.print_exc()
        return 1
    return int(code or 0)


def effective_run(config_path: str, run_url: str | None) -> list[str]:
    """The run folder(s) the stages will use: ``--set-run`` or each stage's section of the config."""
    if run_url:
        return [run_url]
    from lexica.config import stage_section

    return sorted({stage_section(config_path, stage).get("run") or DEFAULT_RUN for stage in STAGES})


def check_run_location(runs: list[str]) -> None:
    """Refuse a relative local run folder inside a Ray job: it would not be one folder.

    A job's driver and every actor run in their own node's unpacked copy of the working
    directory, so a relative path names a different, temporary folder on each node, deleted with
    the job's files. An absolute path works when every node mounts the same filesystem.
    """
    if RAY_JOB_ENV not in os.environ:
        return
    for run in runs:
        if "://" in run and not run.startswith("file://"):
            continue
        path = run.removeprefix("file://")
        if not os.path.isabs(path):
            raise PipelineError(
                f"run {run!r} is a relative path: in a Ray job each node would write into its own temporary "
                "copy of the working directory. Give an s3:// (or other shared) URL, or an absolute path on a "
                "filesystem every node mounts, with --set-run URL or 'run:' in the config")
        print(f"note: run {path} is a local path; every node of the cluster must mount it (shared filesystem)",
              flush=True)


def banner(text: str, out: TextIO) -> None:
    print(f"\n{'=' * 24} {text} {'=' * 24}", file=out, flush=True)


def run_pipeline(config_path: str, stages: list[str], run_url: str | None = None,
                 out: TextIO | None = None) -> list[StageResult]:
    """Run ``stages`` in order; stop at the first one that fails. Returns each stage's result."""
    out = out or sys.stdout  # looked up per call: tests and callers may replace sys.stdout
    results = []
    for number, stage in enumerate(stages, start=1):
        argv = stage_argv(stage, config_path, run_url)
        banner(f"stage {number}/{len(stages)}: {stage}  (lexica {stage} {' '.join(argv)})", out)
        started = time.monotonic()
        code = run_stage(stage, argv)
        # The stages print through both streams; flush so the banner follows their last lines.
        sys.stderr.flush()
        results.append(StageResult(stage, code, time.monotonic() - started))
        verdict = "done" if code == 0 else f"FAILED with exit code {code}"
        banner(f"stage {stage} {verdict} in {results[-1].seconds:.1f} s", out)
        if code != 0:
            break
    return results


def summary_lines(results: list[StageResult], stages: list[str]) -> list[str]:
    lines = ["pipeline summary:"]
    for result in results:
        state = "ok" if result.exit_code == 0 else f"failed (exit {result.exit_code})"
        lines.append(f"  {result.stage:<9} {state:<18} {result.seconds:8.1f} s")
    for stage in stages[len(results):]:
        lines.append(f"  {stage:<9} {'not run':<18}")
    lines.append(f"  total     {sum(r.seconds for r in results):27.1f} s")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lexica pipeline",
        description="Run harvest, train and analysis features in order with one config; the entrypoint of a "
                    "submitted Ray job. Stops at the first failing stage with its exit code.")
    parser.add_argument("--config", help="YAML pipeline config (local path or fsspec URL). Inside a job "
                                         f"submitted by deploy.submit, the config travels in ${CONFIG_TEXT_ENV}")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, always in pipeline order (default {','.join(STAGES)})")
    parser.add_argument("--set-run", metavar="URL", default=None,
                        help="run folder URL for every stage (overrides 'run:' of the config), e.g. s3://bucket/runs/x")
    return parser


def materialise_config(config: str | None) -> tuple[str, str]:
    """(path the stages read, name to show): ``--config``, else the text the submitter shipped."""
    if config:
        if "://" not in config and not os.path.isfile(config):
            raise PipelineError(f"config file {config} does not exist")
        return config, config
    text = os.environ.get(CONFIG_TEXT_ENV)
    if text is None:
        raise PipelineError(f"give --config FILE (or run in a job from deploy.submit, which sets {CONFIG_TEXT_ENV})")
    # Not in the working directory: Ray shares one unpacked copy of it between jobs.
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="lexica-pipeline-", delete=False)
    with handle:
        handle.write(text)
    return handle.name, os.environ.get(CONFIG_SOURCE_ENV, "config shipped by deploy.submit")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    stages = parse_stages(args.stages)
    config_path, config_name = materialise_config(args.config)
    try:
        check_run_location(effective_run(config_path, args.set_run))
        print(f"pipeline: {' → '.join(stages)}; config {config_name}"
              + (f"; run {args.set_run}" if args.set_run else ""), flush=True)
        results = run_pipeline(config_path, stages, args.set_run)
    finally:
        if config_path != args.config:
            os.unlink(config_path)
    print("\n".join(summary_lines(results, stages)), flush=True)
    failed = [result for result in results if result.exit_code != 0]
    return failed[0].exit_code if failed else 0

