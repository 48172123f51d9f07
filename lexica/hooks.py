"""Hook points named the same way for every architecture, and a forward pass that stops there.

``resid_post.L`` is the output of decoder block L, ``resid_pre.L`` its input, ``mlp_out.L`` and
``attn_out.L`` the outputs of its MLP and attention sub-modules. Capturing raises ``_StopForward``
from the hook, so no layer after the hooked one runs; the blocks after it are also dropped from
memory by :func:`prune_after`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lexica.errors import LexicaError

HOOK_KINDS = ("resid_post", "resid_pre", "mlp_out", "attn_out")
# Where decoder blocks live, by architecture family (checked in order on the loaded module).
BLOCK_PATHS = ("layers", "h", "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "decoder.layers", "language_model.layers", "model.language_model.layers", "blocks")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


class HookError(LexicaError, ValueError):
    """An unknown hook point, a layer out of range, or an architecture we cannot resolve."""


@dataclass(frozen=True)
class HookPoint:
    kind: str
    layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}"


def parse_hook(spec: str, n_layers: int) -> HookPoint:
    """``resid_post.15`` / ``mlp_out.middle`` / ``attn_out.-1`` → HookPoint, range-checked."""
    match = re.fullmatch(r"([a-z_]+)\.(-?\d+|middle)", spec.strip())
    if not match or match.group(1) not in HOOK_KINDS:
        raise HookError(f"unknown hook point {spec!r}; expected KIND.LAYER with KIND one of "
                        f"{', '.join(HOOK_KINDS)} and LAYER in 0..{n_layers - 1} or 'middle'")
    kind, layer_text = match.groups()
    layer = n_layers // 2 if layer_text == "middle" else int(layer_text)
    if layer < 0:
        layer += n_layers
    if not 0 <= layer < n_layers:
        raise HookError(f"layer {layer_text} of hook {spec!r} is out of range: this model has "
                        f"{n_layers} blocks, valid layers are 0..{n_layers - 1} (or 'middle')")
    return HookPoint(kind, layer)


def find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner module, attribute name, ModuleList) of the decoder blocks."""
    for dotted in BLOCK_PATHS:
        owner, *path = [model, *dotted.split(".")]
        try:
            for attribute in path[:-1]:
                owner = getattr(owner, attribute)
            blocks = getattr(owner, path[-1])
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return owner, path[-1], blocks
    raise HookError(f"cannot find the decoder blocks of {type(model).__name__}; looked for "
                    f"{', '.join(BLOCK_PATHS)}")


def count_blocks(model: nn.Module) -> int:
    return len(find_blocks(model)[2])


def hook_module(model: nn.Module, hook: HookPoint) -> nn.Module:
    block = find_blocks(model)[2][hook.layer]
    if hook.kind in ("resid_post", "resid_pre"):
        return block
    names = MLP_NAMES if hook.kind == "mlp_out" else ATTENTION_NAMES
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise HookError(f"block {hook.layer} of {type(model).__name__} has no {hook.kind} sub-module "
                    f"(looked for {', '.join(names)}; it has {[n for n, _ in block.named_children()]})")


def prune_after(model: nn.Module, hook: HookPoint) -> None:
    """Drop the blocks after the hooked one: they never run, so they need not hold memory."""
    owner, attribute, blocks = find_blocks(model)
    if len(blocks) > hook.layer + 1:
        setattr(owner, attribute, nn.ModuleList(list(blocks)[: hook.layer + 1]))


class _StopForward(Exception):
    pass


def first_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise HookError(f"hooked module returned {type(value).__name__}; expected a tensor or a tuple of them")


class Capture:
    """Run ``model`` on a batch and return the hook point's activations, stopping right there.

    ``Capture(model, hook)(input_ids=...)`` → tensor [batch, seq, d_model].
    """

    def __init__(self, model: nn.Module, hook: HookPoint):
        self.model = model
        self.module = hook_module(model, hook)
        self.pre = hook.kind == "resid_pre"
        self._captured: torch.Tensor | None = None

    def _on_forward(self, module, args, kwargs, output=None):
        if self.pre:
            value = args[0] if args else kwargs.get("hidden_states")
        else:
            value = output
        self._captured = first_tensor(value)
        raise _StopForward

    def __call__(self, **model_inputs) -> torch.Tensor:
        if self.pre:
            handle = self.module.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        else:
            handle = self.module.register_forward_hook(self._on_forward, with_kwargs=True)
        try:
            self.model(**model_inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        captured, self._captured = self._captured, None
        if captured is None:
            raise HookError("the forward pass finished without reaching the hook point")
        return captured
