"""Bad input gets an error a person can act on, naming the file/row/field/value and what was
expected, and never costs data already written. Real harvests on a tiny model, no Ray, no mocks.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_texts, write_jsonl
from transformers import AutoTokenizer

from lexica.cli import main as lexica_main
from lexica.config import ConfigError
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.corpus import CorpusError
from lexica.harvest.pool import run_harvest
from lexica.hooks import HookError
from lexica.models import ModelConfig, ModelError, load_model
from lexica.storage import StorageError
from lexica.store import ActivationStore, StoreError, StoreMismatchError

CONTEXT = 16
HOOK = "resid_post.2"
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, model: Path, paths: list, **overrides) -> HarvestConfig:
    corpus_overrides = {k: overrides.pop(k) for k in ("docs_per_shard", "invalid_utf8", "text_field")
                        if k in overrides}
    values = {"run": str(tmp_path / "run"), "model": ModelConfig(path=str(model)), "hook": HOOK,
              "corpus": CorpusConfig(paths=[str(p) for p in paths], **{"docs_per_shard": 4, **corpus_overrides}),
              "context_length": CONTEXT, "batch_tokens": 8 * CONTEXT, "workers": WorkersConfig(actors=0),
              **overrides}
    return HarvestConfig(**values).validate()


def stored_rows(url: str) -> list[tuple[int, int, int]]:
    """(doc_id, position, token_id) of every committed row, in store order."""
    rows = []
    for batch in ActivationStore(url).iter_batches(batch_rows=50):
        rows.extend(zip(batch.doc_id.tolist(), batch.position.tolist(), batch.token_id.tolist(), strict=True))
    return rows


def stored_doc_ids(url: str) -> set[int]:
    return {doc_id for doc_id, _, _ in stored_rows(url)}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: compared before/after to prove nothing changed."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def commit_records(url: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(Path(url, "commits").glob("*.json"))]


@pytest.fixture
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


# ---------------------------------------------------------------- 1–2: where the corpus is


def test_missing_corpus_path_is_named(tmp_path, llama):
    missing = tmp_path / "no-such-corpus.jsonl"
    with pytest.raises(CorpusError, match=rf"corpus path {re.escape(str(missing))} does not exist"):
        run_harvest(make_config(tmp_path, llama, [missing]))
    pattern = tmp_path / "*.jsonl"
    with pytest.raises(CorpusError, match=rf"{re.escape(str(pattern))} matched no \.txt/\.jsonl/\.parquet files"):
        run_harvest(make_config(tmp_path, llama, [pattern]))
    assert not (tmp_path / "run" / "activations").exists()


def test_empty_jsonl_holds_no_documents(tmp_path, llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CorpusError, match=rf"corpus {re.escape(str(empty))} holds no documents"):
        run_harvest(make_config(tmp_path, llama, [empty]))
    assert not (tmp_path / "run" / "activations").exists()


def test_folder_without_supported_files(tmp_path, llama):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.md").write_text("# not a corpus file\n")
    (folder / "table.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=rf"corpus path {re.escape(str(folder))} matched no "
                                          r"\.txt/\.jsonl/\.parquet files"):
        run_harvest(make_config(tmp_path, llama, [folder]))


# ---------------------------------------------------------------- 3: not UTF-8


def write_jsonl_with_bad_line(path: Path, texts: list[str], bad_index: int, bad_line: bytes) -> Path:
    lines = [json.dumps({"text": text}).encode() for text in texts]
    lines.insert(bad_index, bad_line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


INVALID_JSONL_LINES = {
    "latin-1 byte": b'{"text": "caf\xe9 au lait"}',
    "lone surrogate escape": b'{"text": "half a pair \\ud800 here"}',
}


@pytest.mark.parametrize("bad_index", [0, 2], ids=["first line", "third line"])
@pytest.mark.parametrize("bad_line", list(INVALID_JSONL_LINES.values()), ids=list(INVALID_JSONL_LINES))
def test_jsonl_line_not_utf8_is_skipped_and_counted_by_default(tmp_path, llama, bad_index, bad_line):
    corpus = write_jsonl_with_bad_line(tmp_path / "mixed.jsonl", sample_texts(4, seed=3), bad_index, bad_line)
    config = make_config(tmp_path, llama, [corpus])
    assert config.corpus.invalid_utf8 == "skip"  # the documented default
    summary = run_harvest(config)
    assert summary.invalid_utf8_documents == 1
    assert summary.documents == 4
    assert stored_doc_ids(summary.store_url) == set(range(5)) - {bad_index}
    skipped = [where for record in commit_records(summary.store_url) for where in record["invalid_utf8_documents"]]
    assert skipped == [f"corpus file {corpus} line {bad_index + 1}"]
    assert ActivationStore(summary.store_url).statistics["invalid_utf8_documents"] == 1


@pytest.mark.parametrize("bad_line", list(INVALID_JSONL_LINES.values()), ids=list(INVALID_JSONL_LINES))
def test_jsonl_line_not_utf8_fails_when_asked(tmp_path, llama, bad_line):
    corpus = write_jsonl_with_bad_line(tmp_path / "mixed.jsonl", sample_texts(4, seed=3), 2, bad_line)
    with pytest.raises(CorpusError, match=rf"corpus file {re.escape(str(corpus))} line 3 is not valid UTF-8 "
                                          r"\(.+\); set corpus.invalid_utf8: skip"):
        run_harvest(make_config(tmp_path, llama, [corpus], invalid_utf8="fail"))


def txt_folder_with_bad_file(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("A first plain document.\nWith two lines.\n", encoding="utf-8")
    bad = folder / "b.txt"
    bad.write_bytes(b"A good first line.\nThen Latin-1: \xe0 la carte.\n")
    (folder / "c.txt").write_text("Zwölf Boxkämpfer, and the last document.\n", encoding="utf-8")
    return folder, bad


def test_txt_file_not_utf8_is_skipped_and_counted_by_default(tmp_path, llama):
    folder, bad = txt_folder_with_bad_file(tmp_path)
    summary = run_harvest(make_config(tmp_path, llama, [folder]))
    assert summary.invalid_utf8_documents == 1
    assert stored_doc_ids(summary.store_url) == {0, 2}  # files sorted by path: a, b, c
    skipped = [where for record in commit_records(summary.store_url) for where in record["invalid_utf8_documents"]]
    assert skipped == [f"corpus file {bad}"]


def test_txt_file_not_utf8_fails_when_asked(tmp_path, llama):
    folder, bad = txt_folder_with_bad_file(tmp_path)
    with pytest.raises(CorpusError, match=rf"corpus file {re.escape(str(bad))} is not valid UTF-8 "
                                          r"\(byte 0xe0 at line 2: invalid continuation byte\)"):
        run_harvest(make_config(tmp_path, llama, [folder], invalid_utf8="fail"))


# ---------------------------------------------------------------- 4: empty documents


def test_empty_documents_are_skipped_and_counted(tmp_path, llama):
    texts = sample_texts(3, seed=4)
    lines = [json.dumps({"text": texts[0]}), json.dumps({"text": ""}), json.dumps({"text": "  \n\t "}),
             "", json.dumps({"text": None}), json.dumps({"text": texts[1]}), json.dumps({"text": texts[2]})]
    corpus = tmp_path / "gaps.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    # docs_per_shard=2: shard 1 (lines 3–4) holds nothing to store and must still commit cleanly.
    summary = run_harvest(make_config(tmp_path, llama, [corpus], docs_per_shard=2))
    assert summary.empty_documents == 4
    assert summary.documents == 3
    assert summary.shards_total == 4
    assert stored_doc_ids(summary.store_url) == {0, 5, 6}
    assert [record["empty_documents"] for record in commit_records(summary.store_url)] == [1, 2, 1, 0]


def test_corpus_of_only_empty_documents_reports_them(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "blank.jsonl", ["", " ", "\n"])
    summary = run_harvest(make_config(tmp_path, llama, [corpus]))
    assert (summary.tokens, summary.documents, summary.empty_documents) == (0, 0, 3)
    assert stored_rows(summary.store_url) == []


# ---------------------------------------------------------------- 5: a document far longer than the context


@pytest.mark.parametrize("bos", ["auto", "never"])
def test_long_document_is_split_and_every_position_stored_once(tmp_path, llama, bos):
    tokenizer = AutoTokenizer.from_pretrained(llama)
    long_text = " ".join(sample_texts(40, seed=5))
    token_ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(token_ids) >= 20 * CONTEXT
    texts = ["A short document before.", long_text, "And a short one after."]
    corpus = write_jsonl(tmp_path / "long.jsonl", texts)
    summary = run_harvest(make_config(tmp_path, llama, [corpus], bos=bos))
    rows = stored_rows(summary.store_url)
    long_rows = [(position, token_id) for doc_id, position, token_id in rows if doc_id == 1]
    assert [position for position, _ in long_rows] == list(range(len(token_ids)))  # in order, each once
    assert [token_id for _, token_id in long_rows] == token_ids
    window_tokens = CONTEXT - 1 if bos == "auto" else CONTEXT  # the tokenizer has a BOS
    short_windows = sum(math.ceil(len(tokenizer(t, add_special_tokens=False)["input_ids"]) / window_tokens)
                        for t in (texts[0], texts[2]))
    windows = sum(record["windows"] for record in commit_records(summary.store_url))
    assert windows == math.ceil(len(token_ids) / window_tokens) + short_windows
    assert summary.tokens == len(rows) == len(set((d, p) for d, p, _ in rows))


# ---------------------------------------------------------------- 6: the text field


def test_jsonl_without_text_field_on_first_line(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "body.jsonl", sample_texts(3), field="body")
    with pytest.raises(CorpusError, match=rf"corpus file {re.escape(str(corpus))} line 1 has no 'text' field "
                                          r"\(fields: \['body', 'id'\]\); set corpus.text_field"):
        run_harvest(make_config(tmp_path, llama, [corpus]))
    assert not (tmp_path / "run" / "activations").exists()  # refused while planning, before any work


def test_jsonl_without_text_field_on_a_later_line(tmp_path, llama):
    lines = [json.dumps({"text": text}) for text in sample_texts(8, seed=6)]
    lines[6] = json.dumps({"body": "misnamed", "id": 7})
    corpus = tmp_path / "late.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, llama, [corpus], docs_per_shard=3)
    with pytest.raises(CorpusError, match=rf"corpus file {re.escape(str(corpus))} line 7 has no 'text' field "
                                          r"\(fields: \['body', 'id'\]\); set corpus.text_field"):
        run_harvest(config)
    # Shards 0 and 1 (lines 1–6) were committed before the bad line was reached; they are kept.
    store = ActivationStore(str(tmp_path / "run" / "activations" / HOOK))
    assert [commit.shard for commit in store.commits()] == [0, 1]
    assert store.verify()["problems"] == []
    assert stored_doc_ids(store.url) == set(range(6))


def test_parquet_without_text_column(tmp_path, llama):
    corpus = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": sample_texts(3), "id": [1, 2, 3]}), corpus)
    with pytest.raises(CorpusError, match=rf"corpus file {re.escape(str(corpus))} has no 'text' column "
                                          r"\(columns: \['body', 'id'\]\); set corpus.text_field"):
        run_harvest(make_config(tmp_path, llama, [corpus]))
    summary = run_harvest(make_config(tmp_path, llama, [corpus], text_field="body"))  # the advice works
    assert stored_doc_ids(summary.store_url) == {0, 1, 2}


# ---------------------------------------------------------------- 7: hook points


@pytest.mark.parametrize(("hook", "message"), [
    ("residual.1", r"unknown hook point 'residual\.1'; expected KIND\.LAYER with KIND one of resid_post, "
                   r"resid_pre, mlp_in, mlp_out, attn_out and LAYER in 0\.\.3 or 'middle'"),
    ("resid_post.4", r"layer 4 of hook 'resid_post\.4' is out of range: this model has 4 blocks, "
                     r"valid layers are 0\.\.3"),
    ("mlp_out.-5", r"layer -5 of hook 'mlp_out\.-5' is out of range: .* valid layers are 0\.\.3"),
])
def test_bad_hook_point_gives_the_valid_range(tmp_path, llama, hook, message):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    with pytest.raises(HookError, match=message):
        run_harvest(make_config(tmp_path, llama, [corpus], hook=hook))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------- 8: the model


def test_missing_model_path_is_named(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=rf"model path {re.escape(str(missing))} does not exist"):
        run_harvest(make_config(tmp_path, missing, [corpus]))
    with pytest.raises(ModelError, match=rf"model path {re.escape(str(missing))} does not exist"):
        load_model(ModelConfig(path=str(missing)))
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    with pytest.raises(ModelError, match=rf"cannot load model '{re.escape(str(not_a_model))}': .*config\.json"):
        run_harvest(make_config(tmp_path, not_a_model, [corpus]))


# ---------------------------------------------------------------- 9: where the store goes


def test_unwritable_output_url_is_named(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for run in (blocker / "run", Path("/proc/lexica-cannot-write-here")):
        config = make_config(tmp_path, llama, [corpus], run=str(run))
        with pytest.raises(StorageError, match=rf"cannot write to {re.escape(str(run))}: "):
            run_harvest(config)
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- 10: a different store already there


def test_existing_store_with_other_configuration_is_kept_unless_overwrite(tmp_path, tiny_models):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(6, seed=7))
    first = run_harvest(make_config(tmp_path, tiny_models["llama"], [corpus]))
    store_folder = Path(first.store_url)
    run_yaml = tmp_path / "run" / "run.yaml"
    before, run_yaml_before = snapshot(store_folder), run_yaml.read_bytes()
    commits_before = commit_records(first.store_url)

    with pytest.raises(StoreMismatchError, match=r"already exists at .*resid_post\.2: .*context_length: existing 16 "
                                                 r"vs requested 24.*--overwrite"):
        run_harvest(make_config(tmp_path, tiny_models["llama"], [corpus], context_length=24))
    with pytest.raises(StoreMismatchError, match=r"model: existing .*llama.* vs requested .*gpt_neox.*tokenizer: "):
        run_harvest(make_config(tmp_path, tiny_models["gpt_neox"], [corpus]))
    with pytest.raises(StoreMismatchError, match=r"dtype: existing \"float16\" vs requested \"bfloat16\""):
        run_harvest(make_config(tmp_path, tiny_models["llama"], [corpus], store_dtype="bfloat16"))
    assert snapshot(store_folder) == before
    assert commit_records(first.store_url) == commits_before
    assert run_yaml.read_bytes() == run_yaml_before

    # Another hook is another store (one per hook point, docs/architecture.md): it sits beside the first.
    other_hook = run_harvest(make_config(tmp_path, tiny_models["llama"], [corpus], hook="mlp_out.1"))
    assert other_hook.store_url != first.store_url
    assert snapshot(store_folder) == before

    replaced = run_harvest(make_config(tmp_path, tiny_models["llama"], [corpus], context_length=24, overwrite=True))
    assert replaced.store_url == first.store_url
    assert replaced.shards_done == replaced.shards_total
    store = ActivationStore(replaced.store_url)
    assert store.manifest["context_length"] == 24
    assert {c.attempt for c in store.commits()}.isdisjoint(c["attempt"] for c in commits_before)
    assert store.orphans() == [] and store.verify()["problems"] == []
    assert stored_doc_ids(store.url) == set(range(6))


# ---------------------------------------------------------------- 11: debris and damage


def test_orphan_parts_are_invisible_reported_and_removed_by_a_rerun(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(8, seed=8))
    config = make_config(tmp_path, llama, [corpus])
    summary = run_harvest(config)
    rows_before = stored_rows(summary.store_url)
    parts = Path(summary.store_url) / "parts"
    crashed = ["shard-000000-deadbeef.parquet", "shard-000001-0123abcd4567.parquet.1a2b3c4d.tmp"]
    (parts / crashed[0]).write_bytes(b"PAR1 half a part, then the machine died")
    (parts / crashed[1]).write_bytes(b"PAR1" + os.urandom(100))

    store = ActivationStore(summary.store_url)
    assert stored_rows(store.url) == rows_before  # never read: readers follow commit records
    assert store.orphans() == sorted(crashed)
    report = store.verify()
    assert report["orphans"] == sorted(crashed) and report["problems"] == []

    rerun = run_harvest(config)
    assert (rerun.orphans_removed, rerun.shards_done, rerun.shards_skipped) == (2, 0, rerun.shards_total)
    assert not any((parts / name).exists() for name in crashed)
    assert ActivationStore(summary.store_url).orphans() == []
    assert stored_rows(summary.store_url) == rows_before


def test_truncated_committed_part_is_reported_by_verify_and_reading(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(8, seed=9))
    summary = run_harvest(make_config(tmp_path, llama, [corpus]))
    store = ActivationStore(summary.store_url)
    damaged = store.commits()[1]
    path = Path(store.part_path(damaged))
    path.write_bytes(path.read_bytes()[: damaged.bytes // 2])
    name = re.escape(damaged.part)

    with pytest.raises(StoreError, match=rf"is damaged: shard 1: part {name} is {damaged.bytes // 2} bytes, "
                                         rf"commit says {damaged.bytes}"):
        store.verify()
    with pytest.raises(StoreError, match=rf"part {name} of shard 1 in .* is corrupt"):
        list(store.iter_batches())
    with pytest.raises(StoreError, match=rf"part {name} of shard 1 in .* is corrupt"):
        store.read_part(damaged)
    assert len(list(store.iter_batches(shards=[0]))) > 0  # the intact shard still reads


def test_part_damaged_in_place_fails_the_checksum_and_reading(tmp_path, llama):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(4, seed=10))
    summary = run_harvest(make_config(tmp_path, llama, [corpus]))
    store = ActivationStore(summary.store_url)
    commit = store.commits()[0]
    path = Path(store.part_path(commit))
    data = bytearray(path.read_bytes())
    data[4:68] = b"\xff" * 64  # same size, footer intact, first page header overwritten
    path.write_bytes(bytes(data))
    assert store.verify(checksums=False)["problems"] == []  # sizes alone cannot see this
    with pytest.raises(StoreError, match=rf"shard 0: part {re.escape(commit.part)} checksum does not match"):
        store.verify()
    with pytest.raises(StoreError, match=rf"part {re.escape(commit.part)} of shard 0 in .* cannot be read "
                                         r"\(OSError: .*\); if storage is reachable the part is damaged"):
        list(store.iter_batches())


# ---------------------------------------------------------------- 12: the command line


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "lexica", "harvest", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]), stderr  # the error is the last thing printed
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_cli_missing_model_exits_2_with_one_line(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    result = run_cli(["--model", "DOES_NOT_EXIST", "--corpus", str(corpus), "--run", str(tmp_path / "run"),
                      "--actors", "0"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, "DOES_NOT_EXIST")
    assert result.stdout == ""
    local = tmp_path / "models" / "missing"
    result = run_cli(["--model", str(local), "--corpus", str(corpus), "--run", str(tmp_path / "run"),
                      "--actors", "0"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, f"model path {local} does not exist")


VALID_KEYS_FRAGMENT = "valid keys: ["


@pytest.mark.parametrize(("assignment", "fragments"), [
    ("bogus=1", ["unknown key(s) ['bogus'] in harvest;", VALID_KEYS_FRAGMENT, "'context_length'"]),
    ("corpus.txt_field=body", ["unknown key(s) ['txt_field'] in harvest.corpus;", "'text_field'"]),
    ("context_length.tokens=5", ["cannot set context_length.tokens: context_length is a value, not a section",
                                 VALID_KEYS_FRAGMENT, "'corpus.text_field'"]),
    ("context_length=lots", ["context_length = 'lots' is invalid; expected an integer"]),
    ("corpus.paths=docs.jsonl", ["corpus.paths = 'docs.jsonl' is invalid; expected a list of strings"]),
    ("hook=[unclosed", ["--set hook: '[unclosed' is not a valid YAML value"]),
])
def test_cli_bad_set_names_the_key(tmp_path, llama, capsys, assignment, fragments):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    code = lexica_main(["harvest", "--model", str(llama), "--corpus", str(corpus), "--run", str(tmp_path / "run"),
                     "--context-length", "16", "--set", assignment])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "run").exists()


def test_cli_bad_flag_value_and_config_file(tmp_path, llama, capsys):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(3))
    common = ["--model", str(llama), "--corpus", str(corpus), "--run", str(tmp_path / "run")]
    assert lexica_main(["harvest", *common, "--docs-per-shard", "many"]) == 2
    assert_one_line_error(capsys.readouterr().err, "corpus.docs_per_shard = 'many' is invalid; expected an integer")
    # The same check guards configs built in Python, where a wrong type used to surface as a
    # TypeError from a comparison inside validate().
    with pytest.raises(ConfigError, match=r"context_length = '16' is invalid; expected an integer"):
        HarvestConfig(model=ModelConfig(path=str(llama)), corpus=CorpusConfig(paths=[str(corpus)]),
                      context_length="16").validate()
    with pytest.raises(ConfigError, match=r"model.revision = 123 is invalid; expected a string or null "
                                          r"\(quote it in YAML to keep it a string\)"):
        HarvestConfig(model=ModelConfig(path=str(llama), revision=123), corpus=CorpusConfig(paths=[str(corpus)]),
                      ).validate()
    missing = tmp_path / "missing.yaml"
    assert lexica_main(["harvest", *common, "--config", str(missing)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"config file {missing} does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("harvest: {context_length: [16\n")
    assert lexica_main(["harvest", *common, "--config", str(broken)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"config file {broken} is not valid YAML")


def test_cli_verify_reports_damage(tmp_path, llama, capsys):
    corpus = write_jsonl(tmp_path / "docs.jsonl", sample_texts(4, seed=11))
    summary = run_harvest(make_config(tmp_path, llama, [corpus]))
    assert lexica_main(["verify", summary.store_url]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    commit = ActivationStore(summary.store_url).commits()[0]
    (Path(summary.store_url) / "parts" / commit.part).write_bytes(b"")
    assert lexica_main(["verify", summary.store_url]) == 2
    assert_one_line_error(capsys.readouterr().err, f"shard 0: part {commit.part} is 0 bytes")
    assert lexica_main(["verify", str(tmp_path / "nowhere")]) == 2
    assert_one_line_error(capsys.readouterr().err, "is not an activation store (no manifest.json)")
