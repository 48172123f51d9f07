"""How much of the model's behaviour a dictionary keeps: run the whole model on held-out text with
the hooked activations replaced by the dictionary's reconstruction, and by zeros.

- ``ce_clean``: next-token cross-entropy of the untouched model;
- ``ce_spliced``: with the reconstruction spliced in; ``delta_ce`` = ce_spliced − ce_clean;
- ``ce_zero``: with the activations zeroed; ``ce_recovered`` = (ce_zero − ce_spliced) /
  (ce_zero − ce_clean): 1 is a perfect dictionary, 0 no better than deleting the layer;
- ``kl``: mean KL(clean ‖ spliced) of the next-token distributions;
- ``fvu`` and ``l0`` of the dictionary on the same held-out activations.

A transcoder (reading one hook point, writing another) replaces its target's activations with its
output from its input's activations in the same pass: mlp_in.L → mlp_out.L stands in for the MLP.

Held-out text is the harvest corpus's documents after the harvested ones (or files the user names).
Positions holding a prepended BOS are never spliced (the store never holds them, so the dictionary
never saw them) and the predictions made there are not scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch

from lexica.harvest.config import CorpusConfig
from lexica.harvest.corpus import iter_documents, plan_shards
from lexica.harvest.packing import split_windows, tokenize
from lexica.hooks import INPUT_KINDS, first_tensor, hook_module, parse_hook

log = logging.getLogger(__name__)


def held_out_documents(manifest: dict, paths: list[str], tokens: int, context_length: int,
                       storage_options: dict | None = None) -> list[tuple[int, str]]:
    """Documents for evaluation: ``paths`` when given, else the harvest corpus after the harvested
    documents; about ``tokens`` tokens' worth (estimated at 4 characters per token)."""
    corpus = CorpusConfig(**{key: value for key, value in manifest["corpus"].items()
                             if key in {f.name for f in dataclasses.fields(CorpusConfig)}})
    unbounded = {"max_documents": None, "max_tokens": None, "docs_per_shard": 1 << 30, "shard_tokens": None}
    if paths:
        corpus, skip = dataclasses.replace(corpus, paths=list(paths), dataset=None, streaming=False, **unbounded), 0
    elif corpus.max_documents is None and corpus.max_tokens is None:
        return []  # the store holds the whole corpus: nothing is held out
    else:
        # A token budget ends inside some document: hold out the ones after the last stored.
        last_stored = (manifest.get("statistics") or {}).get("doc_id_max", -1)
        skip = corpus.max_documents if corpus.max_tokens is None else last_stored + 1
        corpus = dataclasses.replace(corpus, **unbounded)
    plan = plan_shards(corpus, storage_options)
    documents, characters = [], 0
    for doc_id, text in iter_documents(plan, corpus, storage_options, first_doc=skip):
        documents.append((doc_id, text))
        characters += len(text)
        if characters >= 4 * tokens:
            break
    return documents


def evaluation_windows(tokenizer, documents, tokens: int, context_length: int, bos: bool) -> list[torch.Tensor]:
    window_tokens = context_length - (1 if bos else 0)
    windows, total = [], 0
    for window in split_windows(tokenize(tokenizer, documents), window_tokens):
        if len(window.token_ids) < 2 or total >= tokens:
            continue
        ids = torch.as_tensor(window.token_ids, dtype=torch.long)
        if bos:
            ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
        windows.append(ids)
        total += len(ids)
    return windows


class Splice:
    """A forward hook that replaces the hook point's activations (from ``first`` on) by
    ``replace(activations)``; with ``replace=None`` it only records them."""

    def __init__(self, model: torch.nn.Module, hook_name: str, n_layers: int):
        hook = parse_hook(hook_name, n_layers)
        # The module's input for input kinds (mlp_in is the MLP's input, not its output).
        self.module, self.pre = hook_module(model, hook), hook.kind in INPUT_KINDS
        self.replace, self.first, self.seen = None, 0, None

    def _swap(self, value: torch.Tensor) -> torch.Tensor:
        self.seen = value.detach()
        if self.replace is None:
            return value
        swapped = value.clone()
        swapped[:, self.first:] = self.replace(value[:, self.first:]).to(value.dtype)
        return swapped

    def _after(self, module, args, output):
        tensor = first_tensor(output)
        swapped = self._swap(tensor)
        if isinstance(output, torch.Tensor):
            return swapped
        return (swapped, *output[1:])

    def _before(self, module, args, kwargs):
        if args:
            return (self._swap(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._swap(kwargs["hidden_states"])}

    def __enter__(self) -> Splice:
        if self.pre:
            self.handle = self.module.register_forward_pre_hook(self._before, with_kwargs=True)
        else:
            self.handle = self.module.register_forward_hook(self._after)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def source_inputs(source: Splice, activations: torch.Tensor) -> torch.Tensor:
    """A transcoder's inputs [n, d_in] for the target ``activations`` being replaced: what its
    input hook (``source``) saw in this pass at the same positions (the last ones of the pass)."""
    seen = source.seen[:, source.seen.shape[1] - activations.shape[1]:]
    return seen.reshape(-1, seen.shape[-1]).float()


def reconstruct(dictionary: torch.nn.Module, source: Splice | None = None):
    """The hook point's replacement: the dictionary's reconstruction of its activations, or for a
    transcoder its output from what ``source`` (the Splice recording its input hook) saw."""
    def replace(activations: torch.Tensor) -> torch.Tensor:
        flat = activations.reshape(-1, activations.shape[-1]).float() if source is None else \
            source_inputs(source, activations)
        return dictionary.reconstruct(flat).reshape(*activations.shape[:-1], -1)

    return replace


@torch.no_grad()
def evaluate_dictionary(dictionary: torch.nn.Module, manifest: dict, tokens: int = 4096,
                        paths: list[str] | None = None, device: str = "auto",
                        storage_options: dict | None = None, target_hook: str | None = None) -> dict:
    """The metrics above for one dictionary (see :func:`evaluate_dictionaries`)."""
    return evaluate_dictionaries([dictionary], manifest, tokens, paths, device, storage_options, target_hook)[0]


@torch.no_grad()
def evaluate_dictionaries(dictionaries: list[torch.nn.Module], manifest: dict, tokens: int = 4096,
                          paths: list[str] | None = None, device: str = "auto", storage_options: dict | None = None,
                          target_hook: str | None = None) -> list[dict]:
    """The metrics above for each dictionary of the same hook (a sweep's), the model loaded and
    run clean and ablated once for all of them. Each takes raw activations (an export,
    normalisation folded). A transcoder (``target_hook``: the hook it writes) is spliced in place
    of that hook's activations, from the activations of the store's hook in the same pass (for
    mlp_in.L → mlp_out.L: in place of the MLP); its FVU is against the target's activations."""
    from lexica.models import config_from_manifest, load_causal_lm, load_tokenizer, resolve_device

    model_config = config_from_manifest(manifest, device=device, dtype="float32")
    device = resolve_device(device)
    tokenizer = load_tokenizer(model_config)
    model = load_causal_lm(model_config)
    dictionaries = [dictionary.to(device) for dictionary in dictionaries]
    bos = bool(manifest.get("bos", {}).get("prepend"))
    documents = held_out_documents(manifest, paths or [], tokens, manifest["context_length"], storage_options)
    windows = evaluation_windows(tokenizer, documents, tokens, manifest["context_length"], bos)
    if not windows:
        log.warning("no held-out text to evaluate on (the store holds the whole corpus); set train.eval_corpus")
        return [{} for _ in dictionaries]
    n_layers = model.config.num_hidden_layers
    splice = Splice(model, target_hook or manifest["hook"], n_layers)
    splice.first = 1 if bos else 0
    source = None
    if target_hook:
        source = Splice(model, manifest["hook"], n_layers)  # records the transcoder's input
        source.first = splice.first
    shared = {"ce_clean": 0.0, "ce_zero": 0.0, "activations": 0, "square_sum": 0.0}
    totals = [{"ce_spliced": 0.0, "kl": 0.0, "error": 0.0, "l0": 0.0} for _ in dictionaries]
    scored = 0
    activation_sum = None

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum"))

    with splice, (source or contextlib.nullcontext()):
        for ids in windows:
            batch = ids.unsqueeze(0).to(device)
            targets = batch[:, splice.first + 1:]

            def logits_with(replace, batch=batch) -> torch.Tensor:
                splice.replace = replace
                return model(input_ids=batch, use_cache=False).logits[:, splice.first:-1].float()

            clean = logits_with(None)
            activations = splice.seen[0, splice.first:].float()
            inputs = activations if source is None else source.seen[0, source.first:].float()
            shared["ce_clean"] += cross_entropy(clean, targets)
            shared["ce_zero"] += cross_entropy(logits_with(torch.zeros_like), targets)
            clean_log_probs = clean.log_softmax(-1)
            for dictionary, total in zip(dictionaries, totals, strict=True):
                spliced = logits_with(reconstruct(dictionary, source))
                total["ce_spliced"] += cross_entropy(spliced, targets)
                total["kl"] += float((clean_log_probs.exp() * (clean_log_probs - spliced.log_softmax(-1))).sum())
                total["error"] += float((dictionary.reconstruct(inputs) - activations).pow(2).sum())
                total["l0"] += float((dictionary.encode(inputs).values > 0).sum())
            scored += targets.shape[1]
            shared["activations"] += len(activations)
            activation_sum = activations.sum(0) if activation_sum is None else activation_sum + activations.sum(0)
            shared["square_sum"] += float(activations.pow(2).sum())
    count = shared["activations"]
    total_variance = shared["square_sum"] - float(activation_sum.pow(2).sum()) / count
    ce_clean, ce_zero = shared["ce_clean"] / scored, shared["ce_zero"] / scored
    results = []
    for total in totals:
        ce_spliced = total["ce_spliced"] / scored
        gap = ce_zero - ce_clean
        results.append({"ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero, "kl": total["kl"] / scored,
                        "delta_ce": ce_spliced - ce_clean,
                        "ce_recovered": (ce_zero - ce_spliced) / gap if gap > 0 else math.nan,
                        "fvu": total["error"] / total_variance, "l0": total["l0"] / count, "tokens": scored,
                        "documents": len(documents), "doc_ids": [documents[0][0], documents[-1][0]]})
    return results
