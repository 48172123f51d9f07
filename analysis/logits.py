"""Logit effects: which output tokens each feature's decoder direction promotes and suppresses.

The direction is read the way the model's head reads the residual stream: through the final
norm's elementwise gain (and, for LayerNorm, its centring), then the unembedding. The norm's
division by the RMS is a positive scalar per token, so it changes magnitudes, not the ranking.
Directions are unit-normed first, so values compare across features.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lexica.analysis.sources import token_strings
from lexica.models import ModelConfig, load_causal_lm

# Attribute names of the final norm on the base model, per architecture family.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


class Readout:
    """The head's view of the residual stream: gain [d_model], centring flag, unembedding [vocab, d_model]."""

    def __init__(self, unembedding: torch.Tensor, gain: torch.Tensor | None, centre: bool):
        self.unembedding = unembedding
        self.gain = gain
        self.centre = centre

    def logit_directions(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, vocab] logit change per unit of each direction [n, d_model]."""
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.centre:
            directions = directions - directions.mean(dim=1, keepdim=True)
        if self.gain is not None:
            directions = directions * self.gain
        return directions @ self.unembedding.T


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "base_model", model)
    for owner in (base, model):
        for name in FINAL_NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module):
                return module
    return None


def readout_from_model(model: torch.nn.Module) -> Readout:
    """The readout of a loaded causal LM (with its head)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (load it with AutoModelForCausalLM)")
    norm = final_norm(model)
    gain, centre = None, False
    if norm is not None and getattr(norm, "weight", None) is not None:
        gain = norm.weight.detach().float()
        # Gemma stores its RMSNorm gain as an offset from one.
        if "gemma" in getattr(model.config, "model_type", ""):
            gain = gain + 1.0
        centre = isinstance(norm, torch.nn.LayerNorm)
    return Readout(head.weight.detach().float(), gain, centre)


def load_readout(model: ModelConfig) -> Readout:
    return readout_from_model(load_causal_lm(model))


def logit_effects(W_dec: torch.Tensor, readout: Readout, tokenizer, top: int = 10,
                  chunk_features: int = 256) -> pa.Table:
    """``atlas.LOGITS_SCHEMA`` rows: the ``top`` promoted and suppressed tokens of every feature."""
    promoted_ids, promoted_values, suppressed_ids, suppressed_values = [], [], [], []
    device = readout.unembedding.device
    top = min(top, readout.unembedding.shape[0])
    with torch.no_grad():
        for start in range(0, W_dec.shape[0], chunk_features):
            logits = readout.logit_directions(W_dec[start:start + chunk_features].to(device).float())
            high = logits.topk(top, dim=1)
            low = logits.topk(top, dim=1, largest=False)
            promoted_ids.append(high.indices.cpu())
            promoted_values.append(high.values.cpu())
            suppressed_ids.append(low.indices.cpu())
            suppressed_values.append(low.values.cpu())
    # Flat Arrow arrays, strings taken from the distinct tokens' own: no per-feature Python objects,
    # whatever the width.
    columns = {"feature": pa.array(np.arange(W_dec.shape[0], dtype=np.int32))}
    offsets = pa.array(np.arange(W_dec.shape[0] + 1, dtype=np.int32) * top)
    for side, ids, values in (("promoted", promoted_ids, promoted_values),
                              ("suppressed", suppressed_ids, suppressed_values)):
        flat_ids = torch.cat(ids).numpy().astype("int32").ravel()
        distinct, positions = np.unique(flat_ids, return_inverse=True)
        strings = pa.array(token_strings(tokenizer, distinct), pa.string()).take(pa.array(positions.astype(np.int32)))
        columns[f"{side}_ids"] = pa.ListArray.from_arrays(offsets, pa.array(flat_ids))
        columns[f"{side}_tokens"] = pa.ListArray.from_arrays(offsets, strings)
        columns[f"{side}_values"] = pa.ListArray.from_arrays(offsets, pa.array(torch.cat(values).numpy().ravel()
                                                                               .astype("float32")))
    return pa.table(columns)
