"""Sparse kernels for sparse codes: only the dense encoder matmul stays dense.

A code with few non-zeros per row out of d_sae lets decoding and every backward product touch
only the active (row, latent) pairs: the decoder is an ``embedding_bag`` over the active rows, and
the encoder gradient is one COO sparse × dense product instead of a second dense matmul. Codes come
in two shapes: fixed k per row ([B, k], TopK) or a flat list of (row, latent, value) triples
(BatchTopK, where each row has its own count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SelectWithSparseGrad(torch.autograd.Function):
    """Attach encoder gradients to pre-activations chosen outside autograd.

    ``values[i] = (x[rows[i]] - b_dec) · W_enc[:, latents[i]] + b_enc[latents[i]]`` was computed
    densely (and chosen by a top-k) without a graph; backward builds the gradients of W_enc, b_enc
    and b_dec from the chosen pairs only: O(pairs·d_in) instead of O(batch·d_sae·d_in).
    """

    @staticmethod
    def forward(ctx, centered_x, W_enc, b_enc, b_dec, values, rows, latents):
        ctx.save_for_backward(centered_x, W_enc, rows, latents)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        centered_x, W_enc, rows, latents = ctx.saved_tensors
        batch, d_sae = centered_x.shape[0], W_enc.shape[1]
        grad = grad_values.to(centered_x.dtype)
        codes_grad = torch.sparse_coo_tensor(torch.stack([latents, rows]), grad, (d_sae, batch),
                                             check_invariants=False)
        grad_W_enc = torch.sparse.mm(codes_grad.coalesce(), centered_x).t()  # [d_in, d_sae]
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, latents, grad)
        # Σ_i g_i · W_enc[:, latent_i] is W_enc applied to the b_enc gradient; the input was
        # x - b_dec, hence the sign.
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


def select_with_sparse_grad(centered_x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Fixed-k codes: ``values``/``indices`` are [B, k]."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    flat = _SelectWithSparseGrad.apply(centered_x, W_enc, b_enc, b_dec, values.reshape(-1), rows,
                                       indices.reshape(-1))
    return flat.view(batch, k)


def select_flat_with_sparse_grad(centered_x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                                 b_dec: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                                 latents: torch.Tensor) -> torch.Tensor:
    """Flat codes: one entry per active (row, latent) pair."""
    return _SelectWithSparseGrad.apply(centered_x, W_enc, b_enc, b_dec, values, rows, latents)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]], touching only the selected decoder rows."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def sparse_decode_flat(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                       batch: int) -> torch.Tensor:
    """Decode flat (row, latent, value) triples; ``rows`` must be sorted ascending."""
    counts = torch.bincount(rows, minlength=batch)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(latents, W_dec, offsets=offsets, per_sample_weights=values, mode="sum")
