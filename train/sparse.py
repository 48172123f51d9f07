"""Sparse kernels for k-sparse codes: only the dense encoder matmul stays dense.

A code with k non-zeros per row out of d_sae lets decoding and every backward product touch k
rows instead of d_sae: the decoder is an ``embedding_bag`` over the selected rows, and the
encoder-weight gradient is one COO sparse × dense product instead of a second dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SelectWithSparseGrad(torch.autograd.Function):
    """Attach encoder gradients to pre-activations chosen outside autograd.

    ``values[b, j] = (x[b] - b_dec) · W_enc[:, indices[b, j]] + b_enc[indices[b, j]]`` was computed
    densely (and chosen by top-k) without a graph; backward builds the gradients of W_enc, b_enc
    and b_dec from the chosen columns only: O(batch·k·d_in) instead of O(batch·d_sae·d_in).
    """

    @staticmethod
    def forward(ctx, centered_x, W_enc, b_enc, b_dec, values, indices):
        ctx.save_for_backward(centered_x, W_enc, indices)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        centered_x, W_enc, indices = ctx.saved_tensors
        batch, k = indices.shape
        d_sae = W_enc.shape[1]
        flat_indices = indices.reshape(-1)
        flat_grad = grad_values.reshape(-1).to(centered_x.dtype)
        rows = torch.arange(batch, device=centered_x.device).repeat_interleave(k)
        codes_grad = torch.sparse_coo_tensor(torch.stack([flat_indices, rows]), flat_grad, (d_sae, batch),
                                             check_invariants=False)
        grad_W_enc = torch.sparse.mm(codes_grad.coalesce(), centered_x).t()  # [d_in, d_sae]
        grad_b_enc = torch.zeros(d_sae, dtype=flat_grad.dtype, device=flat_grad.device)
        grad_b_enc.index_add_(0, flat_indices, flat_grad)
        # Σ_b Σ_j g[b, j] · W_enc[:, idx[b, j]] is W_enc applied to the b_enc gradient; the input
        # was x - b_dec, hence the sign.
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def select_with_sparse_grad(centered_x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return _SelectWithSparseGrad.apply(centered_x, W_enc, b_enc, b_dec, values, indices)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]], touching only the selected decoder rows."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
