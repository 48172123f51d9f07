"""The optimisers a dictionary can train with (``train.optimizer``) and schedule-free averaging
(``train.schedule: schedule-free``), which wraps any of them.

- ``adam``: torch's Adam, fused where torch has a kernel for the tensor.
- ``signsgd``: each weight moves by ±lr (the sign of its gradient). Scale-free per weight, so the
  rarely firing latents of a sparse dictionary move as fast as the busy ones; with schedule-free
  averaging it is what EleutherAI's sparsify trains with by default.
- ``muon``: torch's Muon (orthogonalised momentum) for the two weight matrices, Adam for the
  biases and thresholds. Its Newton-Schulz iterations cost several encoder matmuls per step: on a
  CPU that is slower per step than the step itself.

Schedule-free averaging (Defazio et al. 2024, "The Road Less Scheduled"): the base optimiser
steps a sequence z; the weights that are evaluated (x) are a running average of z weighted by
the squared learning rate; gradients are taken at y, between the two. It needs no learning-rate decay, and a run can
stop at any step with its best weights. The parameters hold y while training and x after
``eval()``; ``train()`` switches back. Only z is stored (x follows from y and z), so it costs one
copy of the weights.
"""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = ("adam", "signsgd", "muon")
SCHEDULES = ("warmup-decay", "schedule-free")


class SignSGD(torch.optim.Optimizer):
    """w ← w − lr·sign(∇w): one foreach pass per parameter group, no state."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_add_(params, torch._foreach_sign([p.grad for p in params]), alpha=-group["lr"])


class Combined:
    """Several torch optimisers over disjoint parameters, driven as one (Muon cannot take the
    one-dimensional biases; they go to Adam). ``param_groups`` lists every group, so setting a
    learning rate there reaches each optimiser."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [group for optimizer in optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, own in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(own)


def adam(parameters: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel where it has one: one pass over each tensor instead of about
    ten elementwise ones (≈5× less optimiser time on the CPU here). The fused kernel copies a
    non-contiguous tensor in and out (W_enc is kept column-major: its gradient comes out of the
    sparse kernels as [d_sae, d_in] rows), which costs more than it saves; those take the foreach
    path in a second parameter group."""
    betas, eps = (0.9, 0.999), 6.25e-10
    if not all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in parameters):
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps)
    groups = [{"params": [p for p in parameters if p.is_contiguous()], "fused": True},
              {"params": [p for p in parameters if not p.is_contiguous()], "foreach": True}]
    return torch.optim.Adam([group for group in groups if group["params"]], lr=lr, betas=betas, eps=eps)


def muon(parameters: list[torch.Tensor], lr: float) -> Combined:
    """Muon for matrices, with its update scaled to Adam's RMS so the same lr suits both halves."""
    matrices = [p for p in parameters if p.ndim == 2]
    others = [p for p in parameters if p.ndim != 2]
    optimizers = [torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")]
    if others:
        optimizers.append(adam(others, lr))
    return Combined(optimizers)


def base_optimizer(name: str, parameters: list[torch.Tensor], lr: float):
    if name == "adam":
        return adam(parameters, lr)
    if name == "signsgd":
        return SignSGD(parameters, lr)
    if name == "muon":
        return muon(parameters, lr)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


class ScheduleFree:
    """Schedule-free averaging around a base optimiser (see the module docstring).

    With momentum β and averaging weight c = lr_max²/Σlr_max² for this step (lr_max: the largest
    lr so far):
      z ← base step of z with the gradient taken at y
      x ← (1 − c)·x + c·z
      y ← (1 − β)·z + β·x
    x is never stored: x = (y − (1 − β)·z)/β.
    """

    def __init__(self, parameters: list[torch.Tensor], base: str, lr: float, momentum: float = 0.9):
        self.parameters = parameters
        self.momentum = momentum
        self.z = [p.detach().clone() for p in parameters]
        self.base = base_optimizer(base, self.z, lr)
        self.param_groups = self.base.param_groups  # the worker sets each step's lr here
        self.weight_sum = self.lr_max = 0.0
        self.training = True

    @torch.no_grad()
    def step(self) -> None:
        if not self.training:
            raise RuntimeError("ScheduleFree.step() after eval(): call train() first")
        beta = self.momentum
        for z, p in zip(self.z, self.parameters, strict=True):
            z.grad = p.grad
            p.lerp_(z, -(1 - beta) / beta)  # p holds x now
        self.base.step()
        # Weighted by the largest lr so far: warm-up steps count less, a later decay does not.
        self.lr_max = max(self.lr_max, self.param_groups[0]["lr"])
        self.weight_sum += self.lr_max ** 2
        average = self.lr_max ** 2 / self.weight_sum if self.weight_sum > 0 else 1.0
        for z, p in zip(self.z, self.parameters, strict=True):
            z.grad = None
            p.lerp_(z, average)  # x ← (1 − c)·x + c·z
            p.lerp_(z, 1 - beta)  # y ← β·x + (1 − β)·z

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to x, the averaged weights that are evaluated and exported."""
        if self.training:
            for z, p in zip(self.z, self.parameters, strict=True):
                p.lerp_(z, -(1 - self.momentum) / self.momentum)
            self.training = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters back to y, where gradients are taken."""
        if not self.training:
            for z, p in zip(self.z, self.parameters, strict=True):
                p.lerp_(z, 1 - self.momentum)
            self.training = True

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "z": [z.clone() for z in self.z], "weight_sum": self.weight_sum,
                "lr_max": self.lr_max, "training": self.training}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        for z, saved in zip(self.z, state["z"], strict=True):
            z.copy_(saved)
        self.weight_sum, self.lr_max = float(state["weight_sum"]), float(state["lr_max"])
        self.training = bool(state["training"])


def new_optimizer(dictionary: torch.nn.Module, lr: float, name: str = "adam", schedule: str = "warmup-decay",
                  momentum: float = 0.9):
    """The optimiser of ``dictionary``'s parameters: ``name`` (one of ``OPTIMIZERS``), wrapped in
    schedule-free averaging when ``schedule`` is ``schedule-free``."""
    parameters = list(dictionary.parameters())
    if schedule == "schedule-free":
        return ScheduleFree(parameters, name, lr, momentum)
    if schedule != "warmup-decay":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return base_optimizer(name, parameters, lr)


def evaluation_weights(optimizer) -> None:
    """Put the weights that are meant to be evaluated into the parameters (schedule-free: x)."""
    if isinstance(optimizer, ScheduleFree):
        optimizer.eval()


def training_weights(optimizer) -> None:
    if isinstance(optimizer, ScheduleFree):
        optimizer.train()
