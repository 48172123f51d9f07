"""`lexica browse` with the run's model: test your text and steering from the pages, their limits,
and the Host check, on a tiny Llama with a feature planted on one token (test_analysis_steering)."""

from __future__ import annotations

import http.client
import json
import re

import pytest
from test_analysis_steering import HOOK, PLANTED_WORD, PROMPT, TOKEN_FEATURE, build_run, load, planted_model

from lexica.analysis import browse
from lexica.analysis.live import LiveLimits, LiveModel
from lexica.analysis.monitor import monitor
from lexica.analysis.steering import steer_run
from lexica.cli import main as lexica_main

TEXT = "A fox, another fox and a dog; foxes everywhere."
STEERED_FEATURE = 4


@pytest.fixture(scope="module")
def served_run(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    planted = planted_model(tiny_models["llama"], folder / "planted")
    texts = [PROMPT + " dog.", "A fox, another fox and a dog.", "Sparse autoencoders find features."] * 2
    run_folder, _ = build_run(planted, folder, texts)
    assert lexica_main(["analysis", "features", "--run", str(run_folder), "--workers", "0", "--device", "cpu"]) == 0
    live = LiveModel(str(run_folder), None, "cpu", LiveLimits(max_text_chars=200, max_new_tokens=12, timeout_s=30))
    site, _ = browse.resolve_site(str(run_folder), None)
    server, url = browse.serve(site, live=live)
    yield {"run": run_folder, "planted": planted, "live": live, "base": url.removesuffix("index.html"),
           "port": server.server_address[1]}
    server.shutdown()
    server.server_close()


def request(port: int, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload) if payload.startswith(b"{") else {}


def test_test_your_text_marks_exactly_the_tokens_where_the_planted_feature_fires(served_run, page):
    view = page.page
    page.open(served_run["base"] + "index.html")
    view.wait_for_selector("#live-text:not([hidden])")
    view.fill("#text", TEXT)
    view.fill("#watch", str(TOKEN_FEATURE))
    view.click("#analyse")
    view.wait_for_selector("body[data-text='done']")
    marked = [int(index) for index in view.eval_on_selector_all("#text-tokens span.fires",
                                                                 "nodes => nodes.map(n => n.dataset.index)")]
    model, tokenizer = load(served_run["planted"])
    live = served_run["live"]
    expected = monitor(model, tokenizer, live.dictionary, HOOK, [TOKEN_FEATURE], [TEXT], bos=live.bos)
    positions = [place["position"] for place in expected[0]["features"][0]["positions"]]
    assert marked == positions and len(positions) == 3  # " fox", " fox", and " foxes" starts with " fox"
    assert all(view.text_content(f"#text-tokens span[data-index='{index}']") == PLANTED_WORD for index in marked)
    view.click(f"#text-tokens span[data-index='{marked[0]}']")
    assert view.locator("#token-features a", has_text=f"feature {TOKEN_FEATURE}").count() == 1
    view.click(f"#token-features a:text-is('feature {TOKEN_FEATURE}')")
    view.wait_for_url(re.compile(rf".*/feature\.html#{TOKEN_FEATURE}$"))


def test_steering_through_the_page_equals_lexica_steer(served_run, page):
    view = page.page
    page.open(f"{served_run['base']}feature.html#{STEERED_FEATURE}")
    view.wait_for_selector("#steer-run")
    view.fill("#steer-prompt", PROMPT)
    view.fill("#steer-value", "3x")
    view.fill("#steer-tokens", "8")
    view.click("#steer-run")
    view.wait_for_selector("body[data-steer='done']")
    expected = steer_run(str(served_run["run"]), PROMPT, {STEERED_FEATURE: "3x"}, max_new_tokens=8, device="cpu")
    assert view.text_content("#steer-baseline") == PROMPT + expected.baseline_text
    assert view.text_content("#steer-steered") == PROMPT + expected.steered_text
    assert expected.baseline_ids != expected.steered_ids  # the steering did something to compare
    assert "clamped to" in view.text_content("#steer-status")


def test_requests_beyond_the_limits_are_refused_clearly(served_run):
    port, live = served_run["port"], served_run["live"]
    status, answer = request(port, "POST", "/api/tokens", {"text": "x" * 201})
    assert status == 413 and "at most 200" in answer["error"]
    status, answer = request(port, "POST", "/api/steer", {"feature": 4, "prompt": PROMPT, "max_new_tokens": 13})
    assert status == 400 and "1 to 12" in answer["error"]
    status, answer = request(port, "POST", "/api/steer", {"feature": 99, "prompt": PROMPT})
    assert status == 400 and "99" in answer["error"]
    status, answer = request(port, "POST", "/api/tokens", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = request(port, "POST", "/api/tokens", {"text": "  "})
    assert status == 400 and "empty" in answer["error"]
    status, answer = request(port, "POST", "/api/elsewhere", {"text": "hi"})
    assert status == 404
    with live.busy:  # another generation is running
        status, answer = request(port, "POST", "/api/tokens", {"text": "hi"})
    assert status == 429 and "busy" in answer["error"]
    status, answer = request(port, "POST", "/api/tokens", {"text": TEXT, "feature": TOKEN_FEATURE})
    assert status == 200 and sum(value > 0 for value in answer["values"]) == 3


def test_a_foreign_host_or_origin_is_refused(served_run):
    port = served_run["port"]
    status, answer = request(port, "GET", "/index.html", headers={"Host": f"attacker.example:{port}"})
    assert status == 403 and "DNS rebinding" in answer["error"]
    status, _ = request(port, "POST", "/api/tokens", {"text": "hi"}, headers={"Host": "attacker.example"})
    assert status == 403
    status, answer = request(port, "POST", "/api/tokens", {"text": "hi"}, headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in answer["error"]
    status, answer = request(port, "GET", "/api/status", headers={"Host": f"localhost:{port}"})
    assert status == 200 and answer["live"]["dictionary"] == "planted"


def test_without_a_model_the_site_is_served_alone(served_run):
    site, _ = browse.resolve_site(str(served_run["run"]), None)
    server, _ = browse.serve(site)
    try:
        port = server.server_address[1]
        assert request(port, "GET", "/api/status")[1] == {"live": None}
        status, answer = request(port, "POST", "/api/steer", {"feature": 1, "prompt": "hi"})
        assert status == 503 and "no model" in answer["error"]
    finally:
        server.shutdown()
        server.server_close()
