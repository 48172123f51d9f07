"""Hook points named the same way for every architecture, and a forward pass that stops there.

``resid_post.L`` is the output of decoder block L, ``resid_pre.L`` its input, ``mlp_out.L`` and
``attn_out.L`` the outputs of its MLP and attention sub-modules, ``mlp_in.L`` the MLP's input (after
the block's pre-MLP norm, so a transcoder can map ``mlp_in.L`` to ``mlp_out.L``). One forward pass
captures any number of hook points and raises ``_StopForward`` once the last of them is reached, so
no layer after the deepest runs; the blocks after it are also dropped from memory by
:func:`prune_after`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lexica.errors import LexicaError

HOOK_KINDS = ("resid_post", "resid_pre", "mlp_in", "mlp_out", "attn_out")
# Captured from a forward *pre*-hook (the module's input) rather than from its output.
INPUT_KINDS = ("resid_pre", "mlp_in")
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


def parse_hooks(spec: str, n_layers: int) -> list[HookPoint]:
    """Many hook points: a comma-separated list whose layers may also be ranges or ``all``.

    ``resid_post.5,mlp_out.15`` → two; ``resid_post.0-29`` → 30; ``mlp_in.all,mlp_out.all`` → one of
    each kind per block. Duplicates are dropped; the order is as written (ranges ascending).
    """
    hooks: list[HookPoint] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise HookError(f"empty hook point in {spec!r}; expected KIND.LAYER[,KIND.LAYER...]")
        kind, _, layers = item.rpartition(".")
        if layers == "all":
            expanded = [f"{kind}.{layer}" for layer in range(n_layers)]
        elif match := re.fullmatch(r"(\d+)-(\d+)", layers):
            first, last = int(match.group(1)), int(match.group(2))
            if first > last:
                raise HookError(f"hook range {item!r} runs backwards; expected FIRST-LAST with FIRST <= LAST")
            expanded = [f"{kind}.{layer}" for layer in range(first, last + 1)]
        else:
            expanded = [item]
        for name in expanded:
            hook = parse_hook(name, n_layers)
            if hook not in hooks:
                hooks.append(hook)
    return hooks


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
    names = MLP_NAMES if hook.kind in ("mlp_in", "mlp_out") else ATTENTION_NAMES
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise HookError(f"block {hook.layer} of {type(model).__name__} has no {hook.kind} sub-module "
                    f"(looked for {', '.join(names)}; it has {[n for n, _ in block.named_children()]})")


def prune_after(model: nn.Module, hook: HookPoint | list[HookPoint]) -> None:
    """Drop the blocks after the deepest hooked one: they never run, so they need not hold memory."""
    deepest = max(h.layer for h in (hook if isinstance(hook, list) else [hook]))
    owner, attribute, blocks = find_blocks(model)
    if len(blocks) > deepest + 1:
        setattr(owner, attribute, nn.ModuleList(list(blocks)[: deepest + 1]))


class _StopForward(Exception):
    pass


def first_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise HookError(f"hooked module returned {type(value).__name__}; expected a tensor or a tuple of them")


class Capture:
    """Run ``model`` on a batch and return hook points' activations, stopping after the last one.

    ``Capture(model, hook)(input_ids=...)`` → tensor [batch, seq, d_model];
    ``Capture(model, [hooks...])(input_ids=...)`` → {hook name: tensor}. ``transform`` (e.g. keep the
    real tokens, cast to the stored dtype, move to the CPU) runs inside the hook, so only its result
    is kept: the full hidden states of many hook points never pile up together.
    """

    def __init__(self, model: nn.Module, hooks: HookPoint | list[HookPoint]):
        self.model = model
        self.single = isinstance(hooks, HookPoint)
        self.hooks = [hooks] if self.single else list(hooks)
        if not self.hooks:
            raise HookError("no hook point to capture")
        self.modules = [hook_module(model, hook) for hook in self.hooks]
        self._captured: dict[str, torch.Tensor] = {}

    def _callback(self, hook: HookPoint, transform):
        def on_forward(module, args, kwargs, output=None):
            value = (args[0] if args else kwargs.get("hidden_states")) if hook.kind in INPUT_KINDS else output
            tensor = first_tensor(value)
            self._captured[hook.name] = transform(tensor) if transform is not None else tensor
            if len(self._captured) == len(self.hooks):
                raise _StopForward
        return on_forward

    def __call__(self, transform=None, **model_inputs) -> torch.Tensor | dict[str, torch.Tensor]:
        handles = []
        for hook, module in zip(self.hooks, self.modules, strict=True):
            callback = self._callback(hook, transform)
            if hook.kind in INPUT_KINDS:
                handles.append(module.register_forward_pre_hook(callback, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(callback, with_kwargs=True))
        try:
            self.model(**model_inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        captured, self._captured = self._captured, {}
        missing = [hook.name for hook in self.hooks if hook.name not in captured]
        if missing:
            raise HookError(f"the forward pass finished without reaching hook point(s) {', '.join(missing)}")
        return captured[self.hooks[0].name] if self.single else captured
