"""Monitoring on a tiny Llama with a feature planted on one token: it fires exactly where that
token occurs, reported activations equal a direct encode of the captured activations, long texts
are cut into the store's windows, and the CLI writes one JSON line per text."""

from __future__ import annotations

import io
import json

import pytest
import torch
from test_analysis_steering import (
    BIAS_FEATURE,
    BIAS_PLANT,
    HOOK,
    PLANTED_WORD,
    TOKEN_FEATURE,
    TOKEN_PLANT,
    build_run,
    load,
    planted_dictionary,
    planted_model,
)

from lexica.analysis.monitor import monitor, read_texts
from lexica.analysis.sources import AnalysisError
from lexica.cli import main as lexica_main
from lexica.hooks import Capture, parse_hook

TEXTS = ["The quick brown fox jumps over the lazy dog.", "No animal here at all.",
         "A fox, another fox and a dog; foxes everywhere."]
WATCH = [TOKEN_FEATURE, BIAS_FEATURE, 4, 6]


@pytest.fixture(scope="module")
def planted(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    return folder, planted_model(tiny_models["llama"], folder / "planted")


def direct_activations(model, tokenizer, dictionary, ids: list[int], bos: bool) -> torch.Tensor:
    """[tokens, len(WATCH)] by hand: one unbatched forward to the hook, then a dense encode."""
    prefix = [tokenizer.bos_token_id] if bos else []
    with torch.no_grad():
        hidden = Capture(model, parse_hook(HOOK, 4))(input_ids=torch.tensor([prefix + ids]))[0, len(prefix):]
    code = dictionary.encode(hidden.float())
    dense = torch.zeros(len(ids), dictionary.d_sae).scatter_add_(1, code.indices, code.values)
    return dense[:, WATCH]


def reported(entry: dict) -> torch.Tensor:
    values = torch.zeros(len(entry["tokens"]), len(WATCH))
    for column, feature in enumerate(entry["features"]):
        for place in feature["positions"]:
            values[place["position"], column] = place["activation"]
    return values


def test_the_planted_feature_fires_exactly_on_its_token(planted):
    _, folder = planted
    model, tokenizer = load(folder)
    dictionary = planted_dictionary()
    planted_id = tokenizer(PLANTED_WORD, add_special_tokens=False)["input_ids"][0]
    reports = monitor(model, tokenizer, dictionary, HOOK, WATCH, TEXTS, bos=True)
    assert [entry["index"] for entry in reports] == [0, 1, 2]
    for text, entry in zip(TEXTS, reports, strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        token_feature, bias_feature = entry["features"][0], entry["features"][1]
        expected = [position for position, token in enumerate(ids) if token == planted_id]
        assert [place["position"] for place in token_feature["positions"]] == expected
        assert all(place["token"] == PLANTED_WORD and place["activation"] == TOKEN_PLANT
                   for place in token_feature["positions"])
        assert bias_feature["fires"] == len(ids) and bias_feature["max_activation"] == BIAS_PLANT
        # Reported activations are those of a direct, unbatched capture and encode.
        torch.testing.assert_close(reported(entry), direct_activations(model, tokenizer, dictionary, ids, True),
                                   atol=1e-5, rtol=1e-5)
    # " foxes" starts with the " fox" token.
    assert [len(entry["features"][0]["positions"]) for entry in reports] == [1, 0, 3]
    assert all(entry["flagged"] for entry in reports)  # the bias feature fires everywhere

    watched = monitor(model, tokenizer, dictionary, HOOK, [TOKEN_FEATURE], TEXTS, threshold=1.0)
    assert [entry["flagged"] for entry in watched] == [True, False, True]
    assert [entry["features"][0]["max_activation"] for entry in watched] == [TOKEN_PLANT, 0.0, TOKEN_PLANT]


def test_long_texts_are_cut_into_the_stores_windows(planted):
    _, folder = planted
    model, tokenizer = load(folder)
    dictionary = planted_dictionary()
    long_text = " ".join(TEXTS * 3)
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    context = 8  # BOS + 7 text tokens per window
    (entry,) = monitor(model, tokenizer, dictionary, HOOK, WATCH, [long_text], context_length=context, bos=True,
                       batch_tokens=3 * context)
    assert len(entry["tokens"]) == len(ids) > 4 * context
    expected = torch.cat([direct_activations(model, tokenizer, dictionary, ids[start:start + context - 1], True)
                          for start in range(0, len(ids), context - 1)])
    torch.testing.assert_close(reported(entry), expected, atol=1e-5, rtol=1e-5)
    # Windows change the context of random features, so a single pass would report other values.
    whole = direct_activations(model, tokenizer, dictionary, ids, True)
    assert not torch.allclose(whole, expected, atol=1e-3)


def test_bad_input_is_refused(planted, tmp_path):
    _, folder = planted
    model, tokenizer = load(folder)
    with pytest.raises(AnalysisError, match=r"feature 8 is out of range.*d_sae = 8"):
        monitor(model, tokenizer, planted_dictionary(), HOOK, [1, 8], TEXTS)
    with pytest.raises(AnalysisError, match="no features to watch"):
        monitor(model, tokenizer, planted_dictionary(), HOOK, [], TEXTS)
    broken = tmp_path / "texts.jsonl"
    broken.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    with pytest.raises(AnalysisError, match=r"line 3 has no string 'text' field \(it has: body\)"):
        read_texts(str(broken))
    other_field = tmp_path / "bodies.jsonl"
    other_field.write_text('{"body": "one"}\n\n{"body": "two", "id": 2}\n')
    assert read_texts(str(other_field), "body") == ["one", "two"]


def test_the_cli_reports_a_table_and_json_lines(planted, tmp_path, capsys, monkeypatch):
    base, folder = planted
    run_folder, _ = build_run(folder, base, TEXTS * 2)
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n")
    out = tmp_path / "report.jsonl"
    common = ["--run", str(run_folder), "--device", "cpu"]
    assert lexica_main(["monitor", *common, "--watch", "0,4", "--texts", str(texts), "--threshold", "1",
                        "--jsonl", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FLAGGED" in table and "1 of 2 texts flagged" in table and '" fox"@3 3' in table
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1] and [line["flagged"] for line in lines] == [True, False]
    assert lines[0]["dictionary"] == "planted" and lines[0]["hook"] == HOOK
    assert lines[0]["features"][0]["positions"] == [{"position": 3, "token": PLANTED_WORD, "activation": TOKEN_PLANT}]

    monkeypatch.setattr("sys.stdin", io.StringIO(TEXTS[2] + "\n"))
    assert lexica_main(["monitor", *common, "--watch", "0", "--texts", "-", "--json"]) == 0
    (printed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed["features"][0]["fires"] == 3 and printed["text"] == TEXTS[2]

    for extra, message in [(["--watch", "0,99", "--texts", str(texts)], "feature 99 is out of range"),
                           (["--watch", "zero", "--texts", str(texts)], "expected comma-separated feature ids"),
                           (["--watch", "0", "--texts", str(tmp_path / "missing.txt")], "cannot read texts")]:
        assert lexica_main(["monitor", *(common + extra)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error
