"""Export in SAELens' v6 on-disk layout, with input normalisation folded into the weights, and
loading back (safetensors only: never unpickle a dictionary)."""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from lexica import storage
from lexica.errors import LexicaError
from lexica.run import EXPORTED_AT_KEY, export_timestamp
from lexica.train.architectures import build
from lexica.train.shard import SLICED

SAELENS_NAMES = {"standard": "relu"}  # SAELens architecture names that differ from ours
SAELENS_LAYOUT_VERSION = "6.0.0"  # the SAELens cfg.json layout these exports follow


class DictionaryError(LexicaError, ValueError):
    """An exported dictionary's files are missing, damaged or do not fit together."""


def folded_weights(dictionary: torch.nn.Module, scale: float,
                   target_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Weights that take raw activations: SAE_raw(x) = SAE(scale·x) / scale.

    Encoding (x·s − b_dec)·W_enc + b_enc equals (x − b_dec/s)·(s·W_enc) + b_enc, and decoding
    divides by s, so W_enc is multiplied and W_dec and b_dec are divided by s. A transcoder's
    output has its own scale t: decoding divides by t, and the skip path x·s·W_skipᵀ/t takes
    W_skip·s/t.
    """
    out_scale = scale if target_scale is None else target_scale
    with torch.no_grad():
        weights = {"W_enc": (dictionary.W_enc * scale).contiguous(), "b_enc": dictionary.b_enc.clone(),
                   "W_dec": (dictionary.W_dec / out_scale).contiguous(),
                   "b_dec": (dictionary.b_dec / out_scale).contiguous()}
        if getattr(dictionary, "W_skip", None) is not None:
            weights["W_skip"] = (dictionary.W_skip * (scale / out_scale)).contiguous()
        if getattr(dictionary, "transcoder", False):
            # (x·s − m)·W_enc + b_enc = x·(s·W_enc) + (b_enc − m·W_enc): the input mean goes into b_enc.
            weights["b_enc"] = dictionary.b_enc - dictionary.input_mean @ dictionary.W_enc
        # Extras (e.g. JumpReLU thresholds) act on pre-activations, which folding leaves unchanged.
        return {**weights, **dictionary.export_extra()}


def saelens_names(metadata: dict) -> dict:
    """The metadata fields SAELens reads: ``hook_name`` in TransformerLens' spelling
    (``blocks.15.hook_resid_post``) and ``model_name``."""
    from lexica.train.interop import transformer_lens_hook

    # SAELens reads a config without metadata.sae_lens_version as pre-6.0 and drops its metadata:
    # this marks the layout written here as its v6 one.
    names = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None}
    if metadata.get("hook"):
        names["hook_name"] = transformer_lens_hook(metadata["hook"])
    if metadata.get("target_hook"):
        names["hook_name_out"] = transformer_lens_hook(metadata["target_hook"])
    model = metadata.get("model")
    if isinstance(model, dict) and (model.get("id") or model.get("path")):
        names["model_name"] = model.get("id") or model.get("path")
    return names


def transcoder_architecture(architecture: str, skip: bool) -> str:
    """SAELens' name for a transcoder whose encoder is ``architecture`` (as exported): transcoder,
    skip_transcoder, jumprelu_(skip_)transcoder; TopK ones (which SAELens 6.54 lacks) follow
    the same pattern, topk_(skip_)transcoder."""
    stem = "" if architecture == "standard" else architecture + "_"
    return f"{stem}{'skip_' if skip else ''}transcoder"


def export_dictionary(dictionary: torch.nn.Module, scale: float, folder_url: str, metadata: dict,
                      storage_options: dict | None = None, target_scale: float | None = None) -> str:
    """Write ``dictionary`` (trained on activations × ``scale``; a transcoder's targets ×
    ``target_scale``) in SAELens' layout, taking raw activations."""
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    weights = {name: tensor.detach().float().cpu()
               for name, tensor in folded_weights(dictionary, scale, target_scale).items()}
    storage.write_bytes(fs, storage.join(folder, "sae_weights.safetensors"), save(weights))
    storage.write_json(fs, storage.join(folder, "cfg.json"),
                       export_config(dictionary, dictionary.d_sae, "W_skip" in weights, metadata, scale, target_scale))
    return folder_url


def export_config(dictionary: torch.nn.Module, d_sae: int, skip: bool, metadata: dict, scale: float,
                  target_scale: float | None) -> dict:
    """The export's ``cfg.json``: SAELens' fields, then Lexica's own metadata."""
    own = dictionary.export_config()
    transcoder = {}
    if getattr(dictionary, "transcoder", False):
        # SAELens transcoders never subtract b_dec (an output-space bias) from their input.
        transcoder = {"architecture": transcoder_architecture(own["architecture"], skip),
                      "d_out": dictionary.d_out, "apply_b_dec_to_input": False}
    return {
        "d_in": dictionary.d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        **own, **transcoder,
        "metadata": {**saelens_names(metadata), **metadata, "lexica_normalisation_scale_folded": scale,
                     EXPORTED_AT_KEY: export_timestamp(),
                     "lexica_architecture": dictionary.architecture, "k": getattr(dictionary, "k", None),
                     **({"lexica_target_scale_folded": target_scale} if target_scale is not None else {})},
    }


def export_shards(shard_dictionaries: Iterator[torch.nn.Module], scale: float, folder_url: str, metadata: dict,
                  storage_options: dict | None = None, target_scale: float | None = None) -> str:
    """Write a sharded dictionary, given as its shards' modules in shard order (made one at a time
    by the iterator), as one SAELens-layout export identical to the whole dictionary's: each
    shard's folded weights are written into their places in one safetensors file, so no more
    than one shard is ever in memory."""
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    shards = iter(shard_dictionaries)
    first = next(shards)
    count, d_sae = first.shard.count, first.shard.d_sae
    weights = _folded(first, scale, target_scale)
    shapes = {name: [dim * count if SLICED.get(name) == axis else dim for axis, dim in enumerate(tensor.shape)]
              for name, tensor in weights.items()}
    header, offsets = _safetensors_header(shapes)
    local = storage.is_local(fs)
    fs.makedirs(folder, exist_ok=True)
    final = storage.join(folder, "sae_weights.safetensors")
    handle, temp_path = tempfile.mkstemp(suffix=".safetensors.tmp", dir=folder if local else None)
    try:
        total = len(header) + max((end for _, end in offsets.values()), default=0)
        os.ftruncate(handle, total)
        os.pwrite(handle, header, 0)
        base = len(header)
        config = export_config(first, d_sae, "W_skip" in weights, metadata, scale, target_scale)
        for index in range(count):
            dictionary = first if index == 0 else next(shards)
            weights = weights if index == 0 else _folded(dictionary, scale, target_scale)
            for name, tensor in weights.items():
                _write_part(handle, base + offsets[name][0], tensor, shapes[name], SLICED.get(name), index,
                            replicated=name not in SLICED)
            first = weights = dictionary = None  # this shard's memory goes before the next one's comes
        os.fsync(handle)
        os.close(handle)
        handle = None
        if local:
            os.replace(temp_path, final)
        else:
            fs.put(temp_path, final)  # the object appears once its upload completes
    finally:
        if handle is not None:
            os.close(handle)
        if os.path.exists(temp_path):
            os.remove(temp_path)
    storage.write_json(fs, storage.join(folder, "cfg.json"), config)
    return folder_url


def _folded(dictionary: torch.nn.Module, scale: float, target_scale: float | None) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float().cpu().contiguous()
            for name, tensor in folded_weights(dictionary, scale, target_scale).items()}


def _safetensors_header(shapes: dict[str, list[int]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header (8-byte length, JSON padded to 8 bytes) of float32 tensors of
    ``shapes`` laid out in name order, and each tensor's (begin, end) within the data."""
    offsets, position = {}, 0
    for name in sorted(shapes):
        size = 4 * math.prod(shapes[name])
        offsets[name] = (position, position + size)
        position += size
    document = {name: {"dtype": "F32", "shape": shapes[name], "data_offsets": list(offsets[name])}
                for name in sorted(shapes)}
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def _write_part(handle: int, start: int, tensor: torch.Tensor, shape: list[int], axis: int | None, index: int,
                replicated: bool) -> None:
    """Write shard ``index``'s ``tensor`` into its place in a row-major tensor of ``shape``
    beginning at byte ``start``: sliced along ``axis`` 0 it is one contiguous block; along axis 1,
    one block per row; a replicated tensor is written once, by the first shard."""
    if replicated:
        if index == 0:
            os.pwrite(handle, tensor.numpy().tobytes(), start)
        return
    if axis == 0:
        os.pwrite(handle, tensor.numpy().tobytes(), start + index * tensor.numel() * 4)
        return
    rows, width = tensor.shape
    array = tensor.numpy()
    for row in range(rows):
        os.pwrite(handle, array[row].tobytes(), start + (row * shape[1] + index * width) * 4)


def load_dictionary(folder_url: str, storage_options: dict | None = None) -> torch.nn.Module:
    """A dictionary from an exported folder; it takes raw activations (normalisation folded)."""
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    config = storage.read_json(fs, storage.join(folder, "cfg.json"))
    weights_url = storage.join(folder_url, "sae_weights.safetensors")
    path = storage.join(folder, "sae_weights.safetensors")
    try:
        if storage.is_local(fs):
            weights = load_file(path)  # memory-mapped: a wide dictionary is not held twice while loading
        else:
            with fs.open(path, "rb") as handle:
                weights = load(handle.read())
    except SafetensorError as error:
        raise DictionaryError(f"{weights_url} is damaged or truncated ({fs.size(path):,} bytes: {error}); "
                              "re-export the dictionary (re-run lexica train) or copy it again") from error
    metadata = config.get("metadata", {})
    saelens_name = config["architecture"]
    architecture = metadata.get("lexica_architecture", SAELENS_NAMES.get(saelens_name, saelens_name))
    k = config.get("k", metadata.get("k")) or 1  # architectures without k ignore it
    transcoder = {"d_out": config["d_out"], "skip": "W_skip" in weights} if "d_out" in config else {}
    dictionary = build(architecture, d_in=config["d_in"], d_sae=config["d_sae"], k=k, **transcoder)
    if transcoder:
        weights.setdefault("input_mean", torch.zeros(config["d_in"]))  # folded into b_enc on export
    dictionary.load_state_dict(weights)
    return dictionary.requires_grad_(False).eval()  # for inference; fine-tuning re-enables gradients
