"""``lexica submit``: run Lexica's pipeline (or some of its stages) as a job on any Ray cluster.

Goes through the Ray Jobs API of the cluster's dashboard (``http://HEAD:8265``): the repository is
uploaded as the job's working directory (large and generated folders excluded), the config travels
inside the job, optional ``pip`` requirements are installed for clusters whose image lacks Lexica's
dependencies, and S3 credentials set in the submitter's environment are passed to the job's
processes. Their values are never written to a file, printed or logged here; only their names are
shown. ``logs``, ``status`` and ``stop`` follow, inspect and end a submitted job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from lexica.deploy.pipeline import CONFIG_SOURCE_ENV, CONFIG_TEXT_ENV, STAGES, parse_stages
from lexica.errors import LexicaError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Passed through to the job when set here. An endpoint URL is not a secret, but it belongs with them.
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                        "AWS_ENDPOINT_URL")
# gitignore-style patterns, relative to the working directory. Ray refuses packages over 512 MiB,
# and everything here is either generated, local to this machine, or data the job reads by URL.
WORKING_DIR_EXCLUDES = ["/runs/", "/assets/", "/.venv/", "/bench/.venv-peers/", "/.git/", "__pycache__/", "*.pyc",
                        ".pytest_cache/", ".ruff_cache/", "*.egg-info/", "/build/", "node_modules/"]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# Exit codes of `submit --follow` and `stop`, by the job's final state.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class SubmitError(LexicaError, RuntimeError):
    """The job could not be submitted or reached; the message says why and what to do."""


# ---------------------------------------------------------------- what is submitted


def pipeline_entrypoint(stages: list[str], run_url: str | None = None) -> str:
    """The job's command: the pipeline driver with the stages to run (the config comes through the environment)."""
    command = ["python", "-m", "lexica", "pipeline", "--stages", ",".join(stages)]
    if run_url:
        command += ["--set-run", run_url]
    return shlex.join(command)


def passed_credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """The credential variables set (non-empty) in ``environ``, to pass to the job."""
    return {name: environ[name] for name in CREDENTIAL_VARIABLES if environ.get(name)}


def pyproject_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """Lexica's dependencies from pyproject.toml, without Ray: the cluster's own Ray must stay."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    return [spec for spec in dependencies if not _requirement_name(spec) == "ray"]


def _requirement_name(spec: str) -> str:
    name = spec
    for separator in "[<>=!~; ":
        name = name.split(separator)[0]
    return name.strip().lower()


def pip_requirements(specs: list[str], from_pyproject: bool) -> list[str]:
    """``--pip`` values (requirement strings or requirements files) plus, if asked, pyproject's."""
    requirements = pyproject_requirements() if from_pyproject else []
    for spec in specs:
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as handle:
                lines = [line.split("#")[0].strip() for line in handle]
            requirements += [line for line in lines if line]
        else:
            requirements.append(spec)
    return requirements


def read_config(config: str) -> str:
    """The config's text, checked to be YAML here rather than minutes later on the cluster."""
    from lexica.config import ConfigError, load_yaml

    if "://" not in config and not os.path.isfile(config):
        raise SubmitError(f"config file {config} does not exist")
    try:
        load_yaml(config)
    except ConfigError as error:
        raise SubmitError(str(error)) from error
    import fsspec

    with fsspec.open(config, "r", encoding="utf-8") as handle:
        return handle.read()


def build_runtime_env(config_text: str, config_source: str, working_dir: Path, pip: list[str],
                      environ: Mapping[str, str]) -> dict:
    env_vars = {CONFIG_TEXT_ENV: config_text, CONFIG_SOURCE_ENV: config_source, **passed_credentials(environ)}
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES),
                         "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = {"packages": pip, "pip_check": False}
    return runtime_env


# ---------------------------------------------------------------- talking to the cluster


def connect(address: str):
    """A Jobs API client for ``address``, or a SubmitError that says what is wrong."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise SubmitError(
            f"the Ray cluster at {address} refused the request ({str(error).splitlines()[0]}). It uses token "
            "authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the "
            "cluster's token (`ray get-auth-token` on the head node prints it)") from None
    except (ConnectionError, OSError) as error:
        raise SubmitError(
            f"cannot reach a Ray dashboard at {address} ({error}). Is the cluster up, and is this the dashboard "
            "address (http://HEAD:8265, `ray start --head --dashboard-host=...`), not the GCS port 6379?") from None
    except RuntimeError as error:  # a non-Ray server answering, or a Ray too old for the Jobs API
        raise SubmitError(f"{address} does not answer as a Ray Jobs API: {error}") from None


def submit(address: str, config: str, stages: list[str] | None = None, run_url: str | None = None,
           pip: list[str] | None = None, pip_from_pyproject: bool = False, working_dir: Path = REPO_ROOT,
           submission_id: str | None = None, environ: Mapping[str, str] | None = None,
           pass_credentials: bool = True, out: TextIO | None = None) -> str:
    """Submit the pipeline (or ``stages`` of it) with ``config``; returns the job's submission id."""
    stages = list(stages or STAGES)
    environ = os.environ if environ is None else environ
    if not pass_credentials:
        environ = {}
    config_text = read_config(config)
    requirements = pip_requirements(list(pip or []), pip_from_pyproject)
    runtime_env = build_runtime_env(config_text, config, working_dir, requirements, environ)
    client = connect(address)
    entrypoint = pipeline_entrypoint(stages, run_url)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata={"lexica.stages": ",".join(stages), "lexica.config": config})
    except RuntimeError as error:  # e.g. a working directory over Ray's size limit, a duplicate submission id
        raise SubmitError(f"the cluster at {address} refused the job: {' '.join(str(error).split())}") from None
    credentials = sorted(passed_credentials(environ))
    print(f"submitted {job_id} to {address}\n  entrypoint   {entrypoint}\n  config       {config}\n"
          f"  working dir  {working_dir}" + (f"\n  pip          {', '.join(requirements)}" if requirements else "")
          + f"\n  credentials  {', '.join(credentials) if credentials else 'none passed'}",
          file=out or sys.stdout, flush=True)
    return job_id


def job_status(client, job_id: str) -> str:
    """The job's state name (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED)."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as error:
        raise SubmitError(f"no job {job_id} on this cluster ({' '.join(str(error).split())[:200]})") from None


def wait_until(client, job_id: str, states: tuple[str, ...] = TERMINAL_STATES, timeout: float | None = None,
               poll_seconds: float = 1.0) -> str:
    """Poll until the job is in one of ``states``; returns that state (TimeoutError after ``timeout``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = job_status(client, job_id)
        if status in states:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {status} after {timeout:.0f} s (waiting for {'/'.join(states)})")
        time.sleep(poll_seconds)


def follow_logs(client, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's output until it ends; returns its final state."""
    out = out or sys.stdout

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except RuntimeError as error:  # the stream closed early (head restarted, proxy timeout): poll instead
        print(f"(log stream ended: {' '.join(str(error).split())[:200]}; waiting for the job to finish)",
              file=sys.stderr)
    return wait_until(client, job_id)


def stop(client, job_id: str, timeout: float = 60.0) -> str:
    """Ask the job to stop (SIGTERM to its driver, then SIGKILL) and wait until it is STOPPED (or had ended)."""
    status = job_status(client, job_id)
    if status in TERMINAL_STATES:
        return status
    client.stop_job(job_id)
    return wait_until(client, job_id, timeout=timeout)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lexica submit",
        description="Submit Lexica's pipeline to a Ray cluster through its Jobs API, and follow, inspect or stop "
                    "the job. The cluster's address is its dashboard's (default: $RAY_API_SERVER_ADDRESS, "
                    f"$RAY_ADDRESS if it is an http URL, else {DEFAULT_ADDRESS}).")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_address(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--address", default=None, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
        return sub

    send = with_address(commands.add_parser("submit", help="submit the pipeline (or some stages) as a Ray job"))
    send.add_argument("--config", required=True, help="YAML pipeline config (shipped inside the job)")
    send.add_argument("--stages", default=",".join(STAGES),
                      help=f"comma-separated stages, run in pipeline order (default {','.join(STAGES)})")
    send.add_argument("--set-run", metavar="URL", default=None,
                      help="run folder for every stage, e.g. s3://bucket/runs/x (overrides 'run:' of the config)")
    send.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT_OR_FILE",
                      help="pip requirement or requirements file to install in the job's environment (repeatable)")
    send.add_argument("--pip-from-pyproject", action="store_true",
                      help="install Lexica's dependencies from pyproject.toml (Ray excluded) in the job's environment")
    send.add_argument("--working-dir", default=str(REPO_ROOT), help="folder uploaded as the job's working directory")
    send.add_argument("--no-credentials", action="store_true",
                      help="do not pass this environment's AWS_* variables (the cluster has its own credentials)")
    send.add_argument("--submission-id", default=None, help="job id to use (default: Ray chooses one)")
    send.add_argument("--follow", action="store_true",
                      help="stream the logs until the job ends; exit 0 if it SUCCEEDED, 1 if FAILED, 3 if STOPPED")

    logs = with_address(commands.add_parser("logs", help="print a job's logs"))
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    status = with_address(commands.add_parser("status", help="print a job's state"))
    status.add_argument("job_id")
    halt = with_address(commands.add_parser("stop", help="stop a job and wait until it is STOPPED"))
    halt.add_argument("job_id")
    halt.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for STOPPED (default 60)")
    return parser


def default_address(environ: Mapping[str, str]) -> str:
    ray_address = environ.get("RAY_ADDRESS", "")
    # RAY_ADDRESS may also be a GCS address (HOST:6379) or 'auto', which the Jobs API cannot use.
    return environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if ray_address.startswith("http") else DEFAULT_ADDRESS)


JOB_COMMANDS = ("submit", "logs", "status", "stop")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*JOB_COMMANDS, "-h", "--help"):
        argv = ["submit", *argv]  # `lexica submit --config FILE`: submitting is the default
    args = build_parser().parse_args(argv)
    address = args.address or default_address(os.environ)
    try:
        if args.command == "submit":
            job_id = submit(address, args.config, parse_stages(args.stages), args.set_run, args.pip,
                            args.pip_from_pyproject, Path(args.working_dir), args.submission_id,
                            pass_credentials=not args.no_credentials)
            if not args.follow:
                print(f"follow it:  lexica submit logs {job_id} --follow --address {address}")
                return 0
            final = follow_logs(connect(address), job_id)
            print(f"job {job_id}: {final}")
            return EXIT_CODES[final]
        client = connect(address)
        if args.command == "logs":
            if args.follow:
                final = follow_logs(client, args.job_id)
                print(f"job {args.job_id}: {final}")
                return EXIT_CODES[final]
            job_status(client, args.job_id)  # a clear error for an unknown id
            sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        if args.command == "status":
            job_status(client, args.job_id)  # a clear error for an unknown id
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
            return 0
        final = stop(client, args.job_id, args.timeout)
        print(f"job {args.job_id}: {final}")
        return EXIT_CODES[final]
    except TimeoutError as error:
        raise SubmitError(str(error)) from error
    except KeyboardInterrupt:
        print("\ninterrupted: the job keeps running on the cluster (stop it with `lexica submit stop ID`)",
              file=sys.stderr)
        return 130

