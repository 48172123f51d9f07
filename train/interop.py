"""SAELens both ways: hook names in TransformerLens' spelling, and ``lexica import-sae``, which
registers a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``) as a dictionary of
a run, so that ``lexica.Run(run).dictionary(name)``, analysis, steering and monitoring use it like
one Lexica trained.

What an import honours, by folding it into the weights Lexica's architectures compute with:
- ``apply_b_dec_to_input: false``: the encoder reads x, not x − b_dec; b_enc absorbs b_dec·W_enc.
- ``rescale_acts_by_decoder_norm`` (TopK): pre-activations scaled by each decoder row's norm before
  the selection; W_enc and b_enc take the norms, W_dec rows are divided by them.
- ``normalize_activations: none`` (and ``expected_average_only_in``, which a folder on disk
  carries already folded: SAELens applies no run-time scaling for it).
- thresholds (``jumprelu``, and everything SAELens saves as JumpReLU: BatchTopK, Matryoshka).
- transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_(skip_)transcoder``, and Lexica's own
  ``topk_(skip_)transcoder``): ``d_out``-wide decoders, ``W_skip``, and ``hook_name_out`` as the target.
What it refuses, naming the field: per-token run-time normalisations (``layer_norm``,
``constant_norm_rescale``, ``covariance_whitening``), ``hook_z`` reshaping, per-head hooks, hook
points Lexica cannot capture, and architectures it has no equivalent for.
"""

from __future__ import annotations

import argparse
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from lexica import storage
from lexica.errors import LexicaError
from lexica.run import EXPORTED_AT_KEY, Run, export_timestamp
from lexica.train.architectures import build

# Lexica kind → TransformerLens hook within block L.
TL_HOOKS = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "mlp_out": "hook_mlp_out",
            "attn_out": "hook_attn_out", "mlp_in": "ln2.hook_normalized"}
FROM_TL = {hook: kind for kind, hook in TL_HOOKS.items()}
# SAELens architecture → Lexica's (their inference forms: BatchTopK and Matryoshka save as jumprelu).
ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
# SAELens transcoders (and Lexica's TopK ones, which SAELens lacks) → (Lexica architecture, skip path).
TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True),
               "topk_transcoder": ("topk", False), "topk_skip_transcoder": ("topk", True)}
HONOURED_NORMALISATIONS = ("none", "expected_average_only_in", None)


class SAEImportError(LexicaError, ValueError):
    """A SAELens folder Lexica cannot register as it stands (the message names the field)."""


def transformer_lens_hook(hook: str) -> str:
    """``resid_post.15`` → ``blocks.15.hook_resid_post`` (SAELens' and TransformerLens' spelling)."""
    kind, _, layer = hook.partition(".")
    return f"blocks.{layer}.{TL_HOOKS[kind]}" if kind in TL_HOOKS and layer.isdigit() else hook


def lexica_hook(name: str) -> str:
    """``blocks.15.hook_resid_post`` → ``resid_post.15``; a Lexica name passes through."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in FROM_TL:
        return f"{FROM_TL[match.group(2)]}.{match.group(1)}"
    if name.partition(".")[0] in TL_HOOKS and name.partition(".")[2].isdigit():
        return name
    raise SAEImportError(f"hook {name!r} is not one Lexica captures; expected blocks.L.<"
                       f"{'|'.join(TL_HOOKS.values())}> or Lexica's KIND.L")


def read_folder(path: str, storage_options: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    fs, folder = storage.url_to_fs(path, storage_options)
    config_path, weights_path = storage.join(folder, "cfg.json"), storage.join(folder, "sae_weights.safetensors")
    for needed in (config_path, weights_path):
        if not fs.exists(needed):
            raise SAEImportError(f"{path} is not a SAELens folder: {needed.rsplit('/', 1)[-1]} is missing "
                               "(expected cfg.json and sae_weights.safetensors)")
    config = storage.read_json(fs, config_path)
    with fs.open(weights_path, "rb") as handle:
        data = handle.read()
    try:
        weights = load(data)
    except SafetensorError as error:
        raise SAEImportError(f"{weights_path} is damaged or truncated ({len(data):,} bytes: {error})") from error
    return config, weights


def check_normalisation(config: dict, source: str) -> None:
    normalisation = config.get("normalize_activations", "none")
    if normalisation not in HONOURED_NORMALISATIONS:
        raise SAEImportError(f"{source}: normalize_activations {normalisation!r} is a per-token run-time "
                             "normalisation Lexica does not apply; only 'none' can be imported")


def lexica_weights(config: dict, weights: dict[str, torch.Tensor], source: str) -> tuple[str, dict, int]:
    """(Lexica architecture, weights in Lexica's conventions, k) for a SAELens config and weights."""
    architecture = config.get("architecture")
    if architecture in TRANSCODERS:
        return transcoder_weights(config, weights, source)
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        if "threshold" not in weights:
            raise SAEImportError(f"{source}: a {architecture} training checkpoint without a threshold; save it "
                               "with SAELens for inference (it becomes jumprelu) and import that")
        architecture = "jumprelu"
    if architecture not in ARCHITECTURES:
        raise SAEImportError(f"{source}: architecture {architecture!r} has no Lexica equivalent; importable: "
                           f"{', '.join([*ARCHITECTURES, 'batchtopk', 'matryoshka_batchtopk'])}")
    check_normalisation(config, source)
    if config.get("reshape_activations", "none") not in ("none", None):
        raise SAEImportError(f"{source}: reshape_activations {config['reshape_activations']!r} (per-head "
                           "activations) cannot be imported; Lexica's hooks are whole residual-width vectors")
    if (config.get("metadata") or {}).get("hook_head_index") is not None:
        raise SAEImportError(f"{source}: hook_head_index is set (one attention head); Lexica's hooks are whole vectors")
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in weights]
    if missing:
        raise SAEImportError(f"{source}: sae_weights.safetensors lacks {', '.join(missing)}")
    out = {name: weights[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
    if out["W_enc"].shape != (d_in, d_sae) or out["W_dec"].shape != (d_sae, d_in):
        raise SAEImportError(f"{source}: W_enc {tuple(out['W_enc'].shape)} / W_dec {tuple(out['W_dec'].shape)} do "
                           f"not match d_in {d_in}, d_sae {d_sae}")
    if not config.get("apply_b_dec_to_input", True):
        # (x − b_dec)·W_enc + b_enc' = x·W_enc + b_enc exactly when b_enc' = b_enc + b_dec·W_enc.
        out["b_enc"] = out["b_enc"] + out["b_dec"] @ out["W_enc"]
    if config.get("rescale_acts_by_decoder_norm"):
        norms = out["W_dec"].norm(dim=1)
        out["W_enc"], out["b_enc"] = out["W_enc"] * norms, out["b_enc"] * norms
        out["W_dec"] = out["W_dec"] / norms.unsqueeze(1)
    if architecture == "jumprelu":
        threshold = weights.get("threshold")
        if threshold is None:
            raise SAEImportError(f"{source}: a jumprelu dictionary without 'threshold' in its weights")
        # SAELens passes relu(pre) above the threshold: a negative threshold acts as 0.
        out["threshold"] = threshold.float().clamp_min(0)
    k = int(config.get("k") or 1)
    return ARCHITECTURES[architecture], out, k


def transcoder_weights(config: dict, weights: dict[str, torch.Tensor], source: str) -> tuple[str, dict, int]:
    """A transcoder's (Lexica architecture, weights, k): the encoder reads x as it is (SAELens
    transcoders never subtract b_dec, an output-space bias), W_dec and b_dec are d_out wide, and
    a skip-transcoder's W_skip [d_out, d_in] comes along."""
    architecture, skip = TRANSCODERS[config["architecture"]]
    if config.get("apply_b_dec_to_input"):
        raise SAEImportError(f"{source}: apply_b_dec_to_input is true on a transcoder (its b_dec lives in the "
                             "output space); SAELens refuses it too")
    check_normalisation(config, source)
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if skip else []) + \
        (["threshold"] if architecture == "jumprelu" else [])
    missing = [name for name in needed if name not in weights]
    if missing:
        raise SAEImportError(f"{source}: sae_weights.safetensors lacks {', '.join(missing)} ({config['architecture']})")
    out = {name: weights[name].float() for name in needed}
    d_in, d_sae, d_out = int(config["d_in"]), int(config["d_sae"]), int(config.get("d_out") or 0)
    if out["W_enc"].shape != (d_in, d_sae) or out["W_dec"].shape != (d_sae, d_out):
        raise SAEImportError(f"{source}: W_enc {tuple(out['W_enc'].shape)} / W_dec {tuple(out['W_dec'].shape)} do "
                             f"not match d_in {d_in}, d_sae {d_sae}, d_out {d_out}")
    if architecture == "jumprelu":
        out["threshold"] = out["threshold"].clamp_min(0)  # relu(pre) above it: a negative one acts as 0
    return architecture, out, int(config.get("k") or 1)


def import_saelens(path: str, run_url: str, name: str | None = None, storage_options: dict | None = None) -> str:
    """Register the SAELens folder ``path`` as dictionary ``name`` of run ``run_url``; returns the name."""
    config, weights = read_folder(path, storage_options)
    architecture, lexica_state, k = lexica_weights(config, weights, path)
    metadata = config.get("metadata") or {}
    hook = lexica_hook(metadata.get("hook_name") or config.get("hook_name") or "")
    run = Run(storage.absolute_url(run_url), storage_options)
    store_url, model = None, {"id": metadata.get("model_name") or config.get("model_name")}
    if hook in run.hooks():
        store = run.store(hook)
        if store.d_model != int(config["d_in"]):
            raise SAEImportError(f"{path}: d_in {config['d_in']} does not match the run's {hook} store "
                               f"(d_model {store.d_model})")
        store_url, model = store.url, store.manifest["model"]
    transcoder, target_hook = {}, None
    if config.get("architecture") in TRANSCODERS:
        target_hook = lexica_hook(metadata.get("hook_name_out") or config.get("hook_name_out") or "")
        transcoder = {"d_out": int(config["d_out"]), "skip": "W_skip" in lexica_state}
    dictionary = build(architecture, d_in=int(config["d_in"]), d_sae=int(config["d_sae"]), k=k, **transcoder)
    # Checks every shape (a transcoder's input mean is 0: SAELens' encoder reads x as it is).
    dictionary.load_state_dict({**lexica_state, **({"input_mean": torch.zeros(int(config["d_in"]))}
                                                   if transcoder else {})})
    hooks = hook if target_hook is None else f"{hook}-to-{target_hook}"
    name = name or f"imported-{architecture}-{hooks}-{config['d_sae']}"
    exported = {
        **{key: value for key, value in config.items() if key != "metadata"},
        "apply_b_dec_to_input": not transcoder, "normalize_activations": "none",
        "metadata": {**metadata, "hook": hook, "hook_name": transformer_lens_hook(hook), "model": model,
                     **({"target_hook": target_hook, "hook_name_out": transformer_lens_hook(target_hook)}
                        if target_hook else {}),
                     "lexica_store": store_url, "lexica_architecture": architecture, "k": k, "name": name,
                     "lexica_normalisation_scale_folded": 1.0, "lexica_imported_from": path,
                     EXPORTED_AT_KEY: export_timestamp()},
    }
    if config.get("rescale_acts_by_decoder_norm"):
        exported["rescale_acts_by_decoder_norm"] = False  # folded in
    fs, folder = storage.url_to_fs(run.export_url(name), storage_options)
    tensors = {key: value.contiguous() for key, value in lexica_state.items()}
    storage.write_bytes(fs, storage.join(folder, "sae_weights.safetensors"), save(tensors))
    storage.write_json(fs, storage.join(folder, "cfg.json"), exported)
    return name


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lexica import-sae", description="Register a SAELens-format dictionary folder (cfg.json + "
        "sae_weights.safetensors) as a dictionary of a run: analysis, steering and monitoring then use it.")
    parser.add_argument("path", help="the SAELens folder (local path or fsspec URL)")
    parser.add_argument("--run", required=True, help="run folder URL to register it in")
    parser.add_argument("--name", help="dictionary name (default: imported-<architecture>-<hook>-<width>)")
    args = parser.parse_args(argv)
    name = import_saelens(args.path, args.run, args.name)
    print(f"imported {args.path} as dictionary {name}: {Run(args.run).export_url(name)}")
    return 0
