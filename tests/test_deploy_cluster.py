"""Ray cluster jobs for real: a two-node cluster on loopback, the pipeline submitted through the Jobs API.

The cluster is started with ``ray start`` (a head node and a worker node, each with its own temp
dir), never with ``ray.init``: that is what a user's cluster is. Token authentication, on by
default in this Ray, is disabled for this test cluster only (``RAY_AUTH_MODE=disabled`` in the
environment of its processes and of the clients): it listens on loopback alone and lives for
this module. Teardown kills exactly the processes the test started (each node's process group
and their descendants), never ``ray stop``, which would stop every Ray on the host.

Node IPs are 127.0.0.2: Ray rewrites 127.0.0.1 to the host's external address (docs/architecture.md).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from conftest import free_port, sample_texts, write_jsonl

from lexica.deploy import submit as jobs
from lexica.store import ActivationStore

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.2"
HOOK = "resid_post.1"
SECRET_MARKER = "lexica-test-secret-9f3a51"  # must never appear in any output or log file


class LoopbackCluster:
    """A head node and worker nodes started by ``ray start``; each node is one process group."""

    def __init__(self, root: Path):
        self.root = root
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.node_groups: dict[str, int] = {}  # node name → process group of its `ray start`
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # a job's `python` is this venv's
            "RAY_AUTH_MODE": "disabled",  # this loopback-only test cluster; see the module docstring
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # A killed node is declared dead in ~3 s instead of ~30 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        for name in jobs.CREDENTIAL_VARIABLES:
            self.env.pop(name, None)  # credentials reach jobs only through deploy.submit

    def _ray_start(self, name: str, arguments: list[str]) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        command = [str(VENV_BIN / "ray"), "start", f"--node-ip-address={NODE_IP}", f"--temp-dir={temp_dir}",
                   "--min-worker-port=0", "--max-worker-port=0",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *arguments]
        # Its own session: every daemon `ray start` leaves behind keeps this process group.
        process = subprocess.Popen(command, env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        self.node_groups[name] = process.pid
        output, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"ray start for {name} failed:\n{output[-3000:]}")

    def start_head(self) -> None:
        self._ray_start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                                 f"--ray-client-server-port={free_port()}", "--num-cpus=1"])

    def add_worker(self, name: str) -> None:
        self._ray_start(name, [f"--address={NODE_IP}:{self.gcs_port}", "--num-cpus=2",
                               '--resources={"worker_node": 2}'])

    def processes(self, name: str):
        """Every live process of one node: its process group and all their descendants."""
        import psutil

        group = self.node_groups[name]
        found = {}
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == group:
                    found[process.pid] = process
                    for child in process.children(recursive=True):
                        found[child.pid] = child
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def node_id(self, name: str) -> str:
        for process in self.processes(name):
            try:
                if process.name() == "raylet":
                    return next(a.split("=", 1)[1] for a in process.cmdline() if a.startswith("--node_id="))
            except Exception:
                continue
        raise RuntimeError(f"no raylet found for node {name}")

    def kill_node(self, name: str) -> int:
        """SIGKILL a whole node, like a lost machine; returns how many processes were killed."""
        killed = 0
        for _ in range(3):  # processes forked while killing (worker restarts) are caught next round
            victims = self.processes(name)
            for process in victims:
                try:
                    process.send_signal(signal.SIGKILL)
                    killed += 1
                except Exception:
                    pass
            if not victims:
                break
            time.sleep(0.3)
        return killed

    def teardown(self) -> None:
        for name in reversed(list(self.node_groups)):
            self.kill_node(name)
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self):
        return jobs.connect(self.address)

    def alive_actors(self, class_name: str) -> list:
        from ray.util.state import list_actors

        return list_actors(address=self.address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
                           raise_on_missing_output=False)

    def log_files(self):
        for path in self.root.rglob("*"):
            if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ".json"):
                yield path


@pytest.fixture(scope="module")
def cluster():
    # Short root: Ray's Unix sockets live under the temp dir and their paths are limited to 107 bytes.
    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="lexica-ray-", dir="/tmp")))
    try:
        cluster.start_head()
        cluster.add_worker("worker-1")
        yield cluster
    finally:
        cluster.teardown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("deploy-corpus") / "docs.jsonl", sample_texts(240, seed=11))


def write_config(folder: Path, model: Path, corpus: Path, run: Path, docs_per_shard: int, max_documents: int,
                 actors: int = 2) -> Path:
    config = {
        "run": str(run),
        "harvest": {"model": {"path": str(model)}, "hook": HOOK,
                    "corpus": {"paths": [str(corpus)], "docs_per_shard": docs_per_shard,
                               "max_documents": max_documents},
                    "context_length": 32, "batch_tokens": 256, "progress_seconds": 1.0,
                    # A node loss can cost a shard two attempts: the first replacement actor may be
                    # placed on the dying node before Ray declares it dead.
                    "workers": {"actors": actors, "cpus_per_actor": 1, "max_attempts": 5}},
        "train": {"width": "2x", "k": 4, "batch_size": 256, "tokens": 8192, "buffer_rows": 4096, "log_every": 8,
                  "workers": 1, "cpus_per_worker": 1, "checkpoint_every": 16, "eval_tokens": 0},
        "analysis": {"workers": 1, "cpus_per_worker": 1, "top_examples": 5, "samples": 8, "map": False},
    }
    path = folder / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def store_table(url: str) -> pa.Table:
    store = ActivationStore(url)
    tables = [store.read_part(commit, columns=["doc_id", "position", "token_id"]) for commit in store.commits()]
    return pa.concat_tables(tables).sort_by([("doc_id", "ascending"), ("position", "ascending")])


def expected_rows(model: Path, texts: list[str]) -> pa.Table:
    """Every (doc_id, position, token_id) the store must hold: each document's tokens, BOS excluded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    doc_ids, positions, token_ids = [], [], []
    for doc_id, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        doc_ids += [doc_id] * len(ids)
        positions += range(len(ids))
        token_ids += ids
    return pa.table({"doc_id": pa.array(doc_ids, pa.int64()), "position": pa.array(positions, pa.int32()),
                     "token_id": pa.array(token_ids, pa.int32())})


def assert_every_token_once(table: pa.Table, expected: pa.Table) -> None:
    keys = np.stack([table["doc_id"].to_numpy(), table["position"].to_numpy()], axis=1)
    assert len(np.unique(keys, axis=0)) == len(keys), "a (doc_id, position) is stored twice"
    assert table.num_rows == expected.num_rows, f"{table.num_rows} rows stored, {expected.num_rows} expected"
    for column in ("doc_id", "position", "token_id"):
        assert table[column].equals(expected[column]), f"{column} differs from the corpus"


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def submit_cli(cluster: LoopbackCluster, *arguments: str, env: dict | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lexica", "submit", *arguments], cwd=REPO_ROOT,
                          env=env or cluster.env, capture_output=True, text=True, timeout=timeout)


def test_pipeline_job_runs_every_stage_on_the_cluster(cluster, tiny_models, corpus, tmp_path):
    run = tmp_path / "pipeline-run"
    config = write_config(tmp_path, tiny_models["llama"], corpus, run, docs_per_shard=8, max_documents=40)
    credentials = {"AWS_ACCESS_KEY_ID": "lexica-test-key-id", "AWS_SECRET_ACCESS_KEY": SECRET_MARKER}
    # The command a user types: submit, stream the logs, exit with the job's outcome.
    followed = submit_cli(cluster, "submit", "--address", cluster.address, "--config", str(config), "--follow",
                          env={**cluster.env, **credentials}, timeout=500)
    printed = followed.stdout + followed.stderr
    assert followed.returncode == 0, printed[-4000:]
    job_id = re.search(r"submitted (\S+)", printed).group(1)
    assert f"job {job_id}: SUCCEEDED" in printed
    logs = cluster.client().get_job_logs(job_id)
    assert "pipeline summary:" in printed  # streamed while the job ran

    # The three stages ran in order in one driver, with banners and a summary.
    for stage in ("harvest", "train", "analysis"):
        assert re.search(rf"stage {stage} done in [\d.]+ s", logs), stage
    assert logs.index("stage harvest done") < logs.index("stage train done") < logs.index("stage analysis done")
    assert "pipeline summary:" in logs

    store_url = str(run / "activations" / HOOK)
    store = ActivationStore(store_url)
    manifest = store.manifest
    assert manifest["complete"] and len(store.commits()) == len(manifest["plan"]["shards"]) == 5
    expected = expected_rows(tiny_models["llama"], sample_texts(240, seed=11)[:40])
    assert_every_token_once(store_table(store_url), expected)
    assert manifest["statistics"]["tokens"] == store.num_rows

    dictionaries = list((run / "dictionaries").iterdir())
    assert len(dictionaries) == 1
    final_folder = dictionaries[0] / "final"
    assert (final_folder / "cfg.json").is_file() and (final_folder / "sae_weights.safetensors").is_file()
    assert json.loads((final_folder / "cfg.json").read_text())["d_sae"] == 128  # width 2x of d_model 64
    assert any((dictionaries[0] / "checkpoints").rglob("state.pt")), "Ray Train wrote no checkpoint"

    atlas = run / "analysis" / dictionaries[0].name
    for table in ("features", "contexts", "logits"):
        assert (atlas / f"{table}.parquet").is_file(), table
    assert (atlas / "site" / "index.html").is_file()
    recorded = yaml.safe_load((run / "run.yaml").read_text())
    assert {"harvest", "analysis"} <= set(recorded)

    # Credentials went to the job by name; their values appear in no output of ours, no job log and
    # no run file. Ray's own runtime-env agent logs every runtime env it creates, env_vars included
    # (deploy/README.md says so): that file is the only one allowed to hold the value.
    assert "credentials  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in printed
    assert SECRET_MARKER not in printed and SECRET_MARKER not in logs
    holding = {path.name for path in cluster.log_files() if SECRET_MARKER in path.read_text(errors="replace")}
    assert holding <= {"runtime_env_agent.log"}, f"the secret's value is written in {holding}"
    assert not any(SECRET_MARKER in path.read_text(errors="replace") for path in run.rglob("*") if path.is_file()
                   and path.suffix in (".yaml", ".json", ".jsonl", ".html"))

    # The CLI reports the same job.
    status = submit_cli(cluster, "status", job_id, "--address", cluster.address)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr


def test_harvest_survives_a_killed_worker_node(cluster, tiny_models, corpus, tmp_path):
    run = tmp_path / "node-loss-run"
    # Many small shards keep the harvest running long enough for the kill to land mid-run.
    config = write_config(tmp_path, tiny_models["llama"], corpus, run, docs_per_shard=2, max_documents=240)
    job_id = jobs.submit(cluster.address, str(config), stages=["harvest"], environ={}, out=io.StringIO())
    client = cluster.client()
    commits = run / "activations" / HOOK / "commits"
    worker_node = cluster.node_id("worker-1")

    def harvesting_on_worker_node() -> bool:
        assert jobs.job_status(client, job_id) in ("PENDING", "RUNNING"), client.get_job_logs(job_id)[-3000:]
        on_worker = [a for a in cluster.alive_actors("HarvestWorker") if a.node_id == worker_node]
        return bool(on_worker) and commits.is_dir() and len(os.listdir(commits)) >= 4

    # The head has 1 CPU and each actor needs 1: at least one of the 2 actors is on the worker node.
    wait_for(harvesting_on_worker_node, 240, "a harvest actor working on the worker node")
    committed_at_kill = len(os.listdir(commits))
    assert cluster.kill_node("worker-1") > 0
    # The replacement actor needs a CPU the head cannot give; a new node joins, as an autoscaler would add one.
    cluster.add_worker("worker-2")

    final = jobs.wait_until(client, job_id, timeout=300)
    logs = client.get_job_logs(job_id)
    assert final == "SUCCEEDED", logs[-4000:]
    plan_shards = 120
    assert committed_at_kill < plan_shards, "the harvest had finished before the node was killed"
    restarts = int(re.search(r"actor restarts (\d+)", logs).group(1))
    assert restarts >= 1, "no actor died with the node"

    store_url = str(run / "activations" / HOOK)
    store = ActivationStore(store_url)
    assert store.manifest["complete"] and len(store.commits()) == plan_shards
    expected = expected_rows(tiny_models["llama"], sample_texts(240, seed=11))
    assert_every_token_once(store_table(store_url), expected)
    # A part the dead actor left half-written is an orphan: named by no commit, so never read or counted.
    report = store.verify()
    committed_parts = {commit.part for commit in store.commits()}
    assert not set(report["orphans"]) & committed_parts
    assert report["rows"] == store.manifest["statistics"]["tokens"] == expected.num_rows


def test_stop_ends_a_running_job(cluster, tiny_models, corpus, tmp_path):
    run = tmp_path / "stopped-run"
    many = write_jsonl(tmp_path / "many.jsonl", sample_texts(2000, seed=5))  # far more than a stop takes
    config = write_config(tmp_path, tiny_models["llama"], many, run, docs_per_shard=1, max_documents=2000)
    submitted = submit_cli(cluster, "submit", "--address", cluster.address, "--config", str(config),
                           "--stages", "harvest")
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"submitted (\S+)", submitted.stdout).group(1)
    client = cluster.client()
    commits = run / "activations" / HOOK / "commits"
    wait_for(lambda: commits.is_dir() and len(os.listdir(commits)) >= 1, 240, "the first committed shard")

    stopped = submit_cli(cluster, "stop", job_id, "--address", cluster.address)
    assert stopped.returncode == 3 and f"job {job_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert jobs.job_status(client, job_id) == "STOPPED"
    assert len(os.listdir(commits)) < 2000, "the job finished before it was stopped"
    # The driver's actors go with it: nothing keeps harvesting for a stopped job.
    wait_for(lambda: not cluster.alive_actors("HarvestWorker"), 60, "the stopped job's actors to exit")

    unreachable = submit_cli(cluster, "status", job_id, "--address", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2 and "cannot reach a Ray dashboard" in unreachable.stderr
    missing = submit_cli(cluster, "submit", "--address", cluster.address, "--config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml does not exist" in missing.stderr


def test_pipeline_stops_at_the_first_failing_stage_with_its_exit_code(tmp_path, capsys):
    from lexica.cli import main as lexica_main

    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump({"run": str(tmp_path / "run"), "harvest": {
        "model": {"path": str(tmp_path / "no-such-model")}, "corpus": {"paths": [str(tmp_path / "none.jsonl")]}}}))
    # harvest's "bad input" code
    assert lexica_main(["pipeline", "--config", str(config), "--stages", "train,harvest"]) == 2
    output = capsys.readouterr().out
    assert "stage 1/2: harvest" in output and "stage harvest FAILED with exit code 2" in output
    assert "stage 2/2" not in output and re.search(r"train\s+not run", output)


def test_pipeline_in_a_job_refuses_a_relative_run_folder(tmp_path, monkeypatch, capsys):
    from lexica.cli import main as lexica_main
    from lexica.deploy.pipeline import CONFIG_TEXT_ENV, RAY_JOB_ENV

    monkeypatch.setenv(RAY_JOB_ENV, "{}")  # what Ray sets for a submitted job's driver
    monkeypatch.setenv(CONFIG_TEXT_ENV, yaml.safe_dump({"run": "./runs/demo"}))
    assert lexica_main(["pipeline", "--stages", "harvest"]) == 2
    assert "run './runs/demo' is a relative path" in capsys.readouterr().err
    assert lexica_main(["pipeline", "--stages", "harvest", "--set-run", "runs/x", "--config", "/no/such.yaml"]) == 2
    assert "config file /no/such.yaml does not exist" in capsys.readouterr().err
