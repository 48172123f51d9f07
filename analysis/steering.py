"""Steering: generate text with chosen dictionary features clamped at the hook, next to the
untouched model's text from the same prompt and the same random stream.

At the hook, each token's activation h becomes h + Σ_f (v_f − code_f(h))·W_dec[f]: the clamped
reconstruction plus the dictionary's reconstruction error, so only the steered features change and
h is kept exactly where a target equals the feature's own activation. A prepended BOS is never
steered: the store holds no BOS rows, so the dictionary never saw one.

``lexica steer --run RUN --feature 12 --value 10x --prompt "..."``: values are
absolute activations, or multiples of the feature's largest activation in the store ("10x",
"-2x", "0.5x"; from ``features.parquet`` written by ``lexica analysis features``). 0 removes a
feature, negative values invert it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import itertools
import json
import re
import shutil
import textwrap
import time
from dataclasses import dataclass, field

import torch

from lexica.analysis import atlas
from lexica.analysis.config import SteerConfig
from lexica.analysis.sources import AnalysisError, Dictionary, check_width, open_run
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.hooks import count_blocks
from lexica.models import load_causal_lm
from lexica.run import Run
from lexica.train.architectures import SparseCode
from lexica.train.evaluate import Splice, source_inputs

MULTIPLE = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*[xX×]\s*")


@dataclass
class SteeringResult:
    prompt: str
    interventions: dict[int, float]  # feature -> the activation it was clamped to
    prompt_ids: list[int]  # what the model read, BOS included when one was prepended
    baseline_ids: list[int]  # generated tokens only
    steered_ids: list[int]
    baseline_text: str
    steered_text: str
    seed: int
    temperature: float
    stopped_early: bool = False  # a deadline ended a text before max_new_tokens (and before its end token)
    # Filled by steer_run: where the dictionary came from and how the values were written.
    dictionary: str | None = None
    hook: str | None = None
    model: str | None = None
    requested: dict[int, float | str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "dictionary": self.dictionary, "hook": self.hook, "model": self.model, "prompt": self.prompt,
            "features": [{"feature": feature, "value": self.requested.get(feature, value), "activation": value}
                         for feature, value in self.interventions.items()],
            "seed": self.seed, "temperature": self.temperature, "prompt_ids": self.prompt_ids,
            "baseline": {"text": self.baseline_text, "token_ids": self.baseline_ids},
            "steered": {"text": self.steered_text, "token_ids": self.steered_ids},
        }


def feature_values(code: SparseCode, features: torch.Tensor) -> torch.Tensor:
    """[n, len(features)] activation of each listed feature in a sparse code (0 where inactive).

    Padding entries of a code carry value 0, so summing the matches is exact."""
    matches = code.indices.unsqueeze(-1) == features.to(code.indices.device)
    return (code.values.unsqueeze(-1) * matches).sum(1)


def clamp(dictionary: torch.nn.Module, interventions: dict[int, float], source: Splice | None = None):
    """The activation map h → h + Σ_f (v_f − code_f(h))·W_dec[f] for ``Splice.replace``. For a
    transcoder, h is its target hook's activation and the codes come from its input hook's in the
    same pass (``source``, the Splice recording it): the MLP's output moves along the feature's
    decoder direction by what the clamp adds to the feature."""
    features = torch.tensor(list(interventions), dtype=torch.long, device=dictionary.W_dec.device)
    targets = torch.tensor(list(interventions.values()), dtype=torch.float32, device=dictionary.W_dec.device)
    directions = dictionary.W_dec.detach().float()[features]

    def replace(activations: torch.Tensor) -> torch.Tensor:
        flat = activations.reshape(-1, activations.shape[-1]).float()
        inputs = flat if source is None else source_inputs(source, activations)
        current = feature_values(dictionary.encode(inputs), features)
        # A target equal to the current value gives a delta of exactly 0, so h comes back bit for bit.
        return (flat + (targets - current) @ directions).reshape(activations.shape)

    return replace


def check_features(features, d_sae: int, name: str = "the dictionary") -> None:
    for feature in features:
        if not 0 <= int(feature) < d_sae:
            raise AnalysisError(f"feature {feature} is out of range: {name} has d_sae = {d_sae} features "
                                f"(ids 0..{d_sae - 1})")


def context_limit(model: torch.nn.Module) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_ids(tokenizer, prompt: str, bos: bool) -> list[int]:
    if not prompt or not prompt.strip():
        raise AnalysisError("the prompt is empty; give some text to continue")
    # Tokenised as the harvest tokenised documents: no special tokens, BOS by the store's policy.
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise AnalysisError(f"the prompt {prompt!r} has no tokens")
    if bos:
        if tokenizer.bos_token_id is None:
            raise AnalysisError("the store prepends a BOS but this tokenizer has none")
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def check_length(model: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise AnalysisError(f"max_new_tokens = {max_new_tokens}; expected >= 1")
    limit = context_limit(model)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise AnalysisError(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = "
                            f"{prompt_length + max_new_tokens} tokens exceeds the model's context of {limit}; "
                            f"shorten the prompt or ask for at most {max(limit - prompt_length, 0)} new tokens")


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    # Sampled on the CPU with a CPU generator: the same seed gives the same stream on any device.
    probabilities = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _stop_tokens(model: torch.nn.Module) -> set[int]:
    eos = getattr(model.config, "eos_token_id", None)
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


@torch.no_grad()
def generate(model: torch.nn.Module, ids: list[int], max_new_tokens: int, temperature: float, seed: int,
             splice: Splice | None = None, skip_first: bool = False, deadline: float | None = None) -> list[int]:
    """Tokens generated after ``ids`` with the KV cache; ``splice`` (if any) acts on every new
    position: the whole prompt on the first step (from position 1 with ``skip_first``), then
    each generated token as it is fed back. Past ``deadline`` (``time.monotonic()``) it stops
    after the token in hand."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    stop = _stop_tokens(model)
    # transformers 5 renamed ``past_key_values`` to ``cache``; older releases know only the former.
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    cache, generated = None, []
    for step in range(max_new_tokens):
        if splice is not None:
            splice.first = 1 if skip_first and step == 0 else 0
        output = model(input_ids=inputs, use_cache=True, **({cache_keyword: cache} if cache is not None else {}))
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = output.past_key_values
        token = next_token(output.logits[0, -1], temperature, generator)
        generated.append(token)
        if token in stop or (deadline is not None and time.monotonic() > deadline):
            break
        inputs = torch.tensor([[token]], dtype=torch.long, device=device)
    return generated


def steering_splices(model: torch.nn.Module, dictionary: torch.nn.Module, hook_name: str,
                     interventions: dict[int, float], target_hook: str | None = None) -> tuple[Splice, Splice | None]:
    """(the Splice that clamps, the Splice recording a transcoder's input or None): an
    autoencoder's features are clamped at its hook, a transcoder's at its target hook."""
    source = Splice(model, hook_name, count_blocks(model)) if target_hook else None
    splice = Splice(model, target_hook or hook_name, count_blocks(model))
    splice.replace = clamp(dictionary, interventions, source)
    return splice, source


@torch.no_grad()
def clamped_logits(model: torch.nn.Module, dictionary: torch.nn.Module, hook_name: str,
                   interventions: dict[int, float], input_ids: torch.Tensor, skip_first: bool = False,
                   target_hook: str | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] of one forward pass with the features clamped (no cache)."""
    dictionary = dictionary.to(input_ids.device)
    splice, source = steering_splices(model, dictionary, hook_name, interventions, target_hook)
    splice.first = 1 if skip_first else 0
    with splice, source or contextlib.nullcontext():
        return model(input_ids=input_ids, use_cache=False).logits


def steer(model: torch.nn.Module, tokenizer, dictionary: torch.nn.Module, hook_name: str,
          interventions: dict[int, float], prompt: str, max_new_tokens: int = 40, seed: int = 0,
          temperature: float = 0.0, skip_first: bool = False, target_hook: str | None = None,
          deadline: float | None = None) -> SteeringResult:
    """Baseline and steered continuations of ``prompt`` (greedy at temperature 0, else sampled
    with the same seeded stream for both).

    ``model`` is a causal LM; ``dictionary`` takes raw activations of ``hook_name``;
    ``interventions`` maps feature ids to absolute target activations. ``skip_first``: the store
    prepends a BOS (its manifest's ``bos.prepend``): prepend it here too and leave it unsteered.
    ``target_hook``: a transcoder's, where its features are clamped (from ``hook_name``'s codes).
    """
    d_sae = int(dictionary.W_dec.shape[0])
    if not interventions:
        raise AnalysisError("no features to steer; give at least one feature and value")
    check_features(interventions, d_sae)
    interventions = {int(feature): float(value) for feature, value in interventions.items()}
    ids = prompt_ids(tokenizer, prompt, skip_first)
    check_length(model, len(ids), max_new_tokens)
    device = next(model.parameters()).device
    dictionary = dictionary.to(device)
    # A deadline is shared: each text gets half of the time left.
    halfway = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / 2
    baseline = generate(model, ids, max_new_tokens, temperature, seed, deadline=halfway)
    splice, source = steering_splices(model, dictionary, hook_name, interventions, target_hook)
    with splice, source or contextlib.nullcontext():
        steered = generate(model, ids, max_new_tokens, temperature, seed, splice, skip_first, deadline=deadline)
    stop = _stop_tokens(model)
    stopped_early = any(len(tokens) < max_new_tokens and (not tokens or tokens[-1] not in stop)
                        for tokens in (baseline, steered))

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    return SteeringResult(prompt=prompt, interventions=interventions, prompt_ids=ids, baseline_ids=baseline,
                          steered_ids=steered, baseline_text=text(baseline), steered_text=text(steered),
                          seed=seed, temperature=temperature, stopped_early=stopped_early)


# ---------------------------------------------------------------- values and the run

def parse_value(text: str | float) -> float | str:
    """``"3.5"`` → 3.5; ``"10x"`` / ``"-2x"`` / ``"0.5x"`` stay multiples (normalised to "10x")."""
    if isinstance(text, (int, float)):
        return float(text)
    match = MULTIPLE.fullmatch(text)
    if match:
        return f"{float(match.group(1)):g}x"
    try:
        return float(text)
    except ValueError:
        raise AnalysisError(f"feature value {text!r} is neither a number (e.g. 4.5, 0, -3) nor a multiple of the "
                            f"feature's max activation (e.g. 10x, -2x, 0.5x)") from None


def resolve_values(features: dict[int, float | str], dictionary: Dictionary, run_url: str,
                   storage_options: dict | None = None) -> dict[int, float]:
    """Absolute target activations; multiples read each feature's max from ``features.parquet``."""
    requested = {int(feature): parse_value(value) for feature, value in features.items()}
    check_features(requested, dictionary.d_sae, f"dictionary {dictionary.name}")
    multiples = {feature: value for feature, value in requested.items() if isinstance(value, str)}
    if not multiples:
        return dict(requested)
    folder = Run(run_url, storage_options).atlas_url(dictionary.name)
    if not atlas.has_table(folder, "features", storage_options):
        written = ", ".join(f"feature {feature} = {value}" for feature, value in multiples.items())
        raise AnalysisError(f"{written}: a multiple of the max activation needs {folder}/features.parquet, which "
                            f"does not exist; run `lexica analysis features --run {run_url} --dictionary "
                            f"{dictionary.name}` first, or give an absolute value (e.g. --value 5)")
    table = atlas.read_table(folder, "features", storage_options).select(["feature", "max_activation"]).to_pydict()
    maxima = dict(zip(table["feature"], table["max_activation"], strict=True))
    resolved = dict(requested)
    for feature, multiple in multiples.items():
        maximum = maxima.get(feature)
        if not maximum:
            raise AnalysisError(f"feature {feature} never fired in {folder}/features.parquet (max activation "
                                f"{maximum or 0}), so {multiple} of it is 0; give an absolute value instead")
        resolved[feature] = float(multiple[:-1]) * float(maximum)
    return resolved


def steer_run(run_url: str, prompt: str, features: dict[int, float | str], dictionary_name: str | None = None,
              max_new_tokens: int = 40, seed: int = 0, temperature: float = 0.0, device: str = "auto",
              store: str | None = None, model: str | None = None,
              storage_options: dict | None = None) -> SteeringResult:
    """:func:`steer` with the run's dictionary (default: the newest export), the model of the store
    it was trained on and that store's BOS policy."""
    if not features:
        raise AnalysisError("no features to steer; give at least one --feature and --value")
    loaded = open_run(run_url, dictionary_name, store, model, storage_options)
    interventions = resolve_values(features, loaded.dictionary, run_url, storage_options)
    causal_lm = load_causal_lm(dataclasses.replace(loaded.model, device=device))
    check_width(causal_lm, loaded)
    bos = bool((loaded.manifest.get("bos") or {}).get("prepend"))
    result = steer(causal_lm, loaded.tokenizer, loaded.dictionary.module, loaded.hook, interventions, prompt,
                   max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, skip_first=bos,
                   target_hook=loaded.dictionary.target_hook)
    result.dictionary, result.hook, result.model = loaded.dictionary.name, loaded.hook, loaded.model_path
    result.requested = {int(feature): parse_value(value) for feature, value in features.items()}
    return result


# ---------------------------------------------------------------- command line

STEER_FLAGS = {"run": "run", "dictionary": "dictionary", "store": "store", "model": "model", "device": "device",
               "max_new_tokens": "max_new_tokens", "seed": "seed", "temperature": "temperature"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica steer",
                                     description="Generate text with dictionary features clamped, next to the "
                                                 "untouched model's text.")
    add_knob_flags(parser, SteerConfig, "steer", STEER_FLAGS)
    parser.add_argument("--feature", type=int, action="append", default=[], help="feature id to steer (repeatable)")
    parser.add_argument("--value", action="append", default=[],
                        help="its target: an activation (5, 0, -3) or a multiple of its max activation (10x, "
                             "-2x); one per --feature, in the same order")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--width", type=int, default=None, help="output width (default: the terminal's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of columns")
    return parser


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str] = ("baseline", "steered")) -> str:
    column = max(20, (width - 3) // 2)

    def wrapped(text: str) -> list[str]:
        lines = []
        for paragraph in text.split("\n"):
            lines.extend(textwrap.wrap(paragraph, column) or [""])
        return lines

    rows = [f"{titles[0]:<{column}} | {titles[1]}", f"{'-' * column}-+-{'-' * column}"]
    for left_line, right_line in itertools.zip_longest(wrapped(left), wrapped(right), fillvalue=""):
        rows.append(f"{left_line:<{column}} | {right_line}".rstrip())
    return "\n".join(rows)


def describe(result: SteeringResult) -> str:
    settings = []
    for feature, activation in result.interventions.items():
        written = result.requested.get(feature, activation)
        shown = f"{written} (= {activation:.4g})" if isinstance(written, str) else f"{activation:g}"
        settings.append(f"feature {feature} = {shown}")
    sampling = "greedy" if result.temperature <= 0 else f"temperature {result.temperature:g}, seed {result.seed}"
    return (f"dictionary {result.dictionary} at {result.hook} of {result.model}; {sampling}\n"
            f"steering: {', '.join(settings)}\nprompt: {result.prompt!r}")


def main(argv: list[str]) -> int:
    if "--evaluate" in argv:
        from lexica.analysis.steer_eval import main as evaluate_main

        return evaluate_main(argv)
    args = build_parser().parse_args(argv)
    values = stage_section(args.config, "steer") if args.config else {}
    values = apply_overrides(SteerConfig, values, args, STEER_FLAGS, args.set)
    config = from_dict(SteerConfig, values, "steer").validate()
    if not args.feature:
        raise AnalysisError("give at least one --feature ID --value VALUE pair")
    if len(args.feature) != len(args.value):
        raise AnalysisError(f"{len(args.feature)} --feature but {len(args.value)} --value; give one value per "
                            f"feature, in the same order")
    if len(set(args.feature)) != len(args.feature):
        raise AnalysisError(f"a feature is given twice in --feature {args.feature}")
    features = {feature: parse_value(value) for feature, value in zip(args.feature, args.value, strict=True)}
    result = steer_run(config.run, args.prompt, features, config.dictionary, max_new_tokens=config.max_new_tokens,
                       seed=config.seed, temperature=config.temperature, device=config.device, store=config.store,
                       model=config.model, storage_options=config.storage_options)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    print(describe(result))
    print()
    print(side_by_side(result.baseline_text, result.steered_text, width))
    return 0

