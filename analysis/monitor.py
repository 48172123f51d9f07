"""Monitoring: on given texts, where and how strongly each watched dictionary feature fires.

Texts are tokenised and windowed as the harvest did (no special tokens, BOS by the store's policy,
windows of the store's context length that never overlap), run through the model only up to the
hook, and encoded; a text is flagged when any watched feature exceeds the threshold on it.

``lexica monitor --run RUN --watch 12,99 --texts texts.txt``: a table per text, and
one JSON object per text with ``--json`` (stdout) or ``--jsonl OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lexica.analysis.config import MonitorConfig
from lexica.analysis.sources import AnalysisError, LoadedRun, check_width, open_run, token_strings
from lexica.analysis.steering import check_features, context_limit, feature_values
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.harvest import packing
from lexica.hooks import Capture, count_blocks, parse_hook, prune_after
from lexica.models import ModelConfig, load_model
from lexica.train.architectures import SparseCode


@torch.no_grad()
def hook_activations(model: torch.nn.Module, hook_name: str, token_ids: list[np.ndarray], context_length: int,
                     bos: bool, bos_token_id: int | None, pad_id: int = 0,
                     batch_tokens: int = 4096) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The hook's activations of every text, cut into the store's context windows: yields
    (text index, first token position, [window tokens, d_model] float32) per window."""
    window_tokens = context_length - (1 if bos else 0)
    if window_tokens < 1:
        raise AnalysisError(f"context length {context_length} leaves no room for text after the BOS")
    windows = packing.split_windows(list(enumerate(token_ids)), window_tokens)
    capture = Capture(model, parse_hook(hook_name, count_blocks(model)))
    device = next(model.parameters()).device
    offset = 1 if bos else 0
    lengths = [len(window.token_ids) for window in windows]
    for batch in packing.group_by_length(lengths, batch_tokens):
        width = max(lengths[index] for index in batch) + offset
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        keep = torch.zeros((len(batch), width), dtype=torch.bool)
        if bos:
            input_ids[:, 0] = bos_token_id
        for row, index in enumerate(batch):
            input_ids[row, offset:offset + lengths[index]] = torch.from_numpy(windows[index].token_ids.astype(np.int64))
            keep[row, offset:offset + lengths[index]] = True
        # Padding follows every real token, so causal attention never lets a real token see it.
        hidden = capture(input_ids=input_ids.to(device))
        selected = hidden[keep.to(device)].float()
        # Rows of ``selected`` are the batch's windows in order, each window's tokens in order.
        for window_rows, index in zip(selected.split([lengths[index] for index in batch]), batch, strict=True):
            yield windows[index].doc_id, windows[index].start, window_rows


@torch.no_grad()
def watched_activations(model: torch.nn.Module, dictionary: torch.nn.Module, hook_name: str, watch: list[int],
                        token_ids: list[np.ndarray], context_length: int, bos: bool, bos_token_id: int | None,
                        pad_id: int = 0, batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Per text, a [tokens, len(watch)] float32 tensor of the watched features' activations."""
    device = next(model.parameters()).device
    features = torch.tensor(watch, dtype=torch.long, device=device)
    results = [torch.zeros(len(ids), len(watch)) for ids in token_ids]
    for text, start, rows in hook_activations(model, hook_name, token_ids, context_length, bos, bos_token_id,
                                              pad_id, batch_tokens):
        results[text][start:start + len(rows)] = feature_values(dictionary.encode(rows), features).cpu()
    return results


@torch.no_grad()
def text_codes(model: torch.nn.Module, tokenizer, dictionary: torch.nn.Module, hook_name: str, text: str,
               context_length: int, bos: bool, batch_tokens: int = 4096) -> tuple[list[str], SparseCode]:
    """Every token of ``text`` (decoded one by one) and the dictionary's code of each: [tokens, k]
    values and feature ids, cut into windows and BOS-prefixed as the store was."""
    if bos and tokenizer.bos_token_id is None:
        raise AnalysisError("the store prepends a BOS but this tokenizer has none")
    ids = packing.tokenize(tokenizer, [(0, text)])[0][1]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pieces = sorted(((start, dictionary.encode(rows)) for _, start, rows in hook_activations(
        model, hook_name, [ids], context_length, bos, tokenizer.bos_token_id, pad_id, batch_tokens)),
        key=lambda piece: piece[0])  # windows in text order (batches group them by length)
    if not pieces:
        return [], SparseCode(torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.long))
    width = max(code.values.shape[1] for _, code in pieces)  # threshold architectures vary per window

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1])).cpu()

    code = SparseCode(torch.cat([padded(code.values) for _, code in pieces]),
                      torch.cat([padded(code.indices) for _, code in pieces]))
    return token_strings(tokenizer, ids), code


def monitor(model: torch.nn.Module, tokenizer, dictionary: torch.nn.Module, hook_name: str, watch: list[int],
            texts: list[str], threshold: float = 0.0, context_length: int | None = None, bos: bool = False,
            batch_tokens: int = 4096) -> list[dict]:
    """For each text: ``index``, ``tokens`` (decoded one by one), ``flagged`` (any watched feature
    above ``threshold``) and ``features``: per watched feature its ``max_activation``, ``fires``
    (tokens above the threshold) and ``positions`` [{position, token, activation}] in text order.

    ``model`` runs up to ``hook_name`` (a base or causal LM); ``dictionary`` takes raw activations.
    Texts longer than ``context_length`` (default: the model's) are cut into windows as the harvest
    cut documents; ``bos`` prepends the tokenizer's BOS to every window (the store's policy).
    """
    watch = list(dict.fromkeys(int(feature) for feature in watch))
    if not watch:
        raise AnalysisError("no features to watch; give feature ids, e.g. --watch 12,99")
    check_features(watch, int(dictionary.W_dec.shape[0]))
    if threshold < 0:
        raise AnalysisError(f"threshold = {threshold}; expected >= 0 (features fire with positive activations)")
    context_length = context_length or context_limit(model)
    if not context_length:
        raise AnalysisError(f"{type(model).__name__} records no context length; give context_length")
    if bos and tokenizer.bos_token_id is None:
        raise AnalysisError("the store prepends a BOS but this tokenizer has none")
    device = next(model.parameters()).device
    dictionary = dictionary.to(device)
    token_ids = [ids for _, ids in packing.tokenize(tokenizer, list(enumerate(texts)))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    activations = watched_activations(model, dictionary, hook_name, watch, token_ids, context_length, bos,
                                      tokenizer.bos_token_id, pad_id, batch_tokens)
    reports = []
    for index, (ids, values) in enumerate(zip(token_ids, activations, strict=True)):
        tokens = token_strings(tokenizer, ids)
        features = []
        for column, feature in enumerate(watch):
            by_position = values[:, column]
            positions = torch.nonzero(by_position > threshold).flatten().tolist()
            features.append({
                "feature": feature,
                "max_activation": float(by_position.max()) if len(by_position) else 0.0,
                "fires": len(positions),
                "positions": [{"position": position, "token": tokens[position],
                               "activation": float(by_position[position])} for position in positions],
            })
        reports.append({"index": index, "text": texts[index], "tokens": tokens,
                        "flagged": any(entry["fires"] for entry in features), "features": features})
    return reports


@dataclass
class MonitorReport:
    dictionary: str
    hook: str
    model: str
    threshold: float
    watch: list[int]
    texts: list[dict]  # what monitor() returns


def load_base_model(model: ModelConfig, hook_name: str) -> torch.nn.Module:
    """The base model in float32, cut after the hooked block (the rest never runs)."""
    loaded = load_model(dataclasses.replace(model, dtype="float32"))
    prune_after(loaded.model, parse_hook(hook_name, count_blocks(loaded.model)))
    return loaded.model


def monitor_run(run_url: str, watch: list[int], texts: list[str], dictionary_name: str | None = None,
                threshold: float = 0.0, device: str = "auto", store: str | None = None, model: str | None = None,
                batch_tokens: int = 4096, storage_options: dict | None = None) -> MonitorReport:
    """:func:`monitor` with the run's dictionary and the context length and BOS policy of its store."""
    loaded: LoadedRun = open_run(run_url, dictionary_name, store, model, storage_options)
    check_features(watch, loaded.dictionary.d_sae, f"dictionary {loaded.dictionary.name}")
    if not texts:
        raise AnalysisError("no texts to monitor")
    base = load_base_model(dataclasses.replace(loaded.model, device=device), loaded.hook)
    check_width(base, loaded)
    bos = bool((loaded.manifest.get("bos") or {}).get("prepend"))
    results = monitor(base, loaded.tokenizer, loaded.dictionary.module, loaded.hook, watch, texts, threshold,
                      context_length=int(loaded.manifest["context_length"]), bos=bos, batch_tokens=batch_tokens)
    return MonitorReport(dictionary=loaded.dictionary.name, hook=loaded.hook, model=loaded.model_path,
                         threshold=threshold, watch=list(dict.fromkeys(watch)), texts=results)


# ---------------------------------------------------------------- texts and the command line

def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Texts from a .jsonl file (``text_field`` of each object), any other file (one per line),
    or ``-`` (stdin, one per line); blank lines are skipped."""
    if source == "-":
        lines, name = sys.stdin.read().splitlines(), "stdin"
    else:
        try:
            with open(source, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as error:
            raise AnalysisError(f"cannot read texts from {source}: {error.strerror or error}") from error
        name = source
    if not source.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnalysisError(f"{name} line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise AnalysisError(f"{name} line {number} has no string {text_field!r} field (it has: {fields}); "
                                f"set --text-field")
        texts.append(record[text_field])
    return texts


def parse_watch(text: str) -> list[int]:
    try:
        features = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise AnalysisError(f"--watch {text!r}: expected comma-separated feature ids, e.g. 12,99,1234") from None
    if not features:
        raise AnalysisError("--watch is empty; give feature ids, e.g. 12,99,1234")
    return features


def format_table(report: MonitorReport, top: int = 5, preview: int = 60) -> str:
    lines = [f"dictionary {report.dictionary} at {report.hook} of {report.model}; watching features "
             f"{', '.join(map(str, report.watch))}; threshold {report.threshold:g}", ""]
    header = f"{'text':>5}  {'feature':>7}  {'max act':>9}  {'fires':>5}  top positions (token@position activation)"
    lines.append(header)
    lines.append("-" * len(header))
    for entry in report.texts:
        shown = entry["text"] if len(entry["text"]) <= preview else entry["text"][:preview - 1] + "…"
        lines.append(f"{entry['index']:>5}  {json.dumps(shown, ensure_ascii=False)}"
                     f"{'  FLAGGED' if entry['flagged'] else ''}")
        for feature in entry["features"]:
            strongest = sorted(feature["positions"], key=lambda place: -place["activation"])[:top]
            places = ", ".join(f"{json.dumps(place['token'], ensure_ascii=False)}@{place['position']} "
                               f"{place['activation']:.3g}" for place in strongest)
            lines.append(f"{'':>5}  {feature['feature']:>7}  {feature['max_activation']:>9.4g}  "
                         f"{feature['fires']:>5}  {places}".rstrip())
    flagged = sum(entry["flagged"] for entry in report.texts)
    lines.append("")
    lines.append(f"{flagged} of {len(report.texts)} texts flagged")
    return "\n".join(lines)


MONITOR_FLAGS = {"run": "run", "dictionary": "dictionary", "store": "store", "model": "model", "device": "device",
                 "text_field": "text_field", "threshold": "threshold", "top": "top", "batch_tokens": "batch_tokens"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica monitor",
                                     description="Report where watched dictionary features fire on given texts.")
    add_knob_flags(parser, MonitorConfig, "monitor", MONITOR_FLAGS)
    parser.add_argument("--watch", required=True, help="comma-separated feature ids, e.g. 12,99,1234")
    parser.add_argument("--texts", required=True, help=".txt (one text per line), .jsonl, or - for stdin")
    parser.add_argument("--jsonl", help="also write one JSON object per text to this file")
    parser.add_argument("--json", action="store_true", help="print the JSON lines instead of the table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    values = stage_section(args.config, "monitor") if args.config else {}
    config = from_dict(MonitorConfig, apply_overrides(MonitorConfig, values, args, MONITOR_FLAGS, args.set),
                       "monitor").validate()
    watch = parse_watch(args.watch)
    texts = read_texts(args.texts, config.text_field)
    report = monitor_run(config.run, watch, texts, config.dictionary, threshold=config.threshold,
                         device=config.device, store=config.store, model=config.model,
                         batch_tokens=config.batch_tokens, storage_options=config.storage_options)
    lines = [json.dumps({"dictionary": report.dictionary, "hook": report.hook, **entry}, ensure_ascii=False)
             for entry in report.texts]
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    print("\n".join(lines) if args.json else format_table(report, config.top))
    return 0

