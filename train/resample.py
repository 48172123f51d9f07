"""Resampling dead latents (Anthropic 2023, "Towards Monosemanticity"), for every architecture.

Every ``train.resample_every`` steps, each latent that has not fired for ``dead_tokens`` tokens is
re-initialised toward an input the dictionary reconstructs badly: inputs of the batch are drawn
with probability ∝ (squared error)², the latent's decoder row becomes the drawn input's direction
(less b_dec) at the live rows' mean norm (a transcoder's: the drawn target's direction), its
encoder column the input's direction at 0.2× the live columns' mean norm, its bias 0, and its
optimiser state is cleared so that stale moments do not throw it off again. A learned per-latent
threshold (JumpReLU) is set to half the new latent's pre-activation on its own input, so that it
fires there.

TopK-family dictionaries also have AuxK for dead latents; resampling is an option on top. ReLU and
JumpReLU have nothing else.
"""

from __future__ import annotations

import torch

from lexica.train.optimizers import ScheduleFree

ENCODER_SCALE = 0.2  # new encoder columns at this fraction of the live ones' norm (Anthropic 2023)


@torch.no_grad()
def resample_dead(dictionary: torch.nn.Module, optimizer, batch: torch.Tensor, dead_mask: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Re-initialise the latents in ``dead_mask`` from ``batch``; returns their ids. Under
    data parallelism every worker agrees on the dead latents (the tracker sums firing counts) and
    takes rank 0's new weights, so the replicas stay equal."""
    dead = dead_mask.nonzero().view(-1)
    if not len(dead):
        return dead
    alive = ~dead_mask
    x, y = dictionary.split(batch) if hasattr(dictionary, "split") else (batch, batch)
    error = dictionary.reconstruct(x) - y
    weights = error.pow(2).sum(1).square().double()
    if not float(weights.sum()) > 0:
        weights = torch.ones_like(weights)
    chosen = torch.multinomial(weights.cpu(), len(dead), replacement=len(dead) > len(batch), generator=generator)
    chosen = chosen.to(batch.device)
    # A transcoder reads one space and writes another: its encoder takes the input's direction,
    # its decoder the target's (for an autoencoder both are the input less b_dec).
    centred = x[chosen] - getattr(dictionary, "input_offset", dictionary.b_dec)
    written = y[chosen] - dictionary.b_dec
    decoder_norm = dictionary.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    encoder_norm = dictionary.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    new_decoder = written / written.norm(dim=1, keepdim=True).clamp_min(1e-8) * decoder_norm
    new_encoder = (centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-8)).t() * (ENCODER_SCALE * encoder_norm)
    updates = {"W_dec": (new_decoder, 0), "W_enc": (new_encoder, 1),
               "b_enc": (torch.zeros(len(dead), dtype=batch.dtype, device=batch.device), 0)}
    threshold = getattr(dictionary, "threshold", None)
    if isinstance(threshold, torch.nn.Parameter):  # a learned per-latent threshold (JumpReLU)
        own = (centred * new_encoder.t()).sum(1)  # each new latent's pre-activation on its own input
        updates["threshold"] = (own / 2, 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for value, _ in updates.values():
            torch.distributed.broadcast(value, src=0)
    parameters = dict(dictionary.named_parameters())
    for name, (value, dim) in updates.items():
        parameters[name].index_copy_(dim, dead, value.to(parameters[name].dtype))
        forget_state(optimizer, parameters[name], dead, dim)
    return dead


def forget_state(optimizer, parameter: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Clear ``optimizer``'s per-element state of ``parameter`` at ``index`` along ``dim`` (Adam's
    moments, Muon's momentum); under schedule-free averaging also move z there to the new value,
    so the averaged weights restart from it rather than from the dead latent's past."""
    if isinstance(optimizer, ScheduleFree):
        position = next(i for i, p in enumerate(optimizer.parameters) if p is parameter)
        z = optimizer.z[position]
        z.index_copy_(dim, index, parameter.detach().index_select(dim, index))
        forget_state(optimizer.base, z, index, dim)
        return
    for inner in getattr(optimizer, "optimizers", [optimizer]):  # Combined (Muon + Adam) or one
        for value in inner.state.get(parameter, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                value.index_fill_(dim, index, 0)
