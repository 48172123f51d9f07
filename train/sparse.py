"""Sparse kernels for sparse codes: only the dense encoder matmul stays dense.

A code with few non-zeros per row out of d_sae lets decoding and every backward product touch
only the active (row, latent) pairs. A ``SparsePattern`` describes those pairs once per step, both
row-major (rows are the bags of the decode's ``embedding_bag``) and latent-major (latents are the
bags of the encoder-weight and decoder-weight gradients, each one more ``embedding_bag`` over the
same ordering, sorted once). ``embedding_bag`` rather than a CSR × dense product: on the CPU its
kernel ran ≈1.8× faster at 131k pairs × 512 and writes its result once, where the CSR product
zero-fills, then copies, a dense output (and its CPU kernel, FBGEMM's, is hard to beat: a C
decode of our own measured no faster). On the CPU in float32, the decode's backward is one C
kernel (``train/kernels/decode_backward.c``, through ``train.native``) that computes the code's
and the decoder's gradients in one latent-major pass, reading each pair's gradient row once:
≈2× the sampled product plus the embedding_bag it replaces, which stay as its fallback and
elsewhere. Codes come in two shapes: fixed k per row ([B, k], TopK) or a flat list of (row,
latent) pairs with rows ascending (BatchTopK, JumpReLU, ReLU: each row has its own count).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lexica.train import native

# sampled_addmm takes its pattern as a CSR tensor; the product is tested against dense autograd.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparsePattern(NamedTuple):
    rows: torch.Tensor  # [pairs] ascending
    latents: torch.Tensor  # [pairs]
    offsets: torch.Tensor  # [batch] first pair of each row (embedding_bag offsets)
    by_latent: torch.Tensor  # [pairs] permutation ordering pairs by latent
    latent_starts: torch.Tensor  # [d_sae + 1] first pair of each latent in by_latent order, then the total
    rows_by_latent: torch.Tensor  # [pairs] rows[by_latent]
    batch: int
    d_sae: int

    def sum_by_latent(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """[d_sae, d]: for each latent, Σ over its pairs of value · dense[row] (``values`` in pair
        order): the transposed code matrix times ``dense``, touching only the pairs."""
        return F.embedding_bag(self.rows_by_latent, dense, self.latent_starts, mode="sum",
                               per_sample_weights=values.index_select(0, self.by_latent), include_last_offset=True)

    def pair_dots(self, by_row: torch.Tensor, by_latent: torch.Tensor) -> torch.Tensor:
        """[pairs]: ⟨by_row[row], by_latent[latent]⟩ for every pair, i.e. by_row @ by_latentᵀ
        sampled at the pattern only (a sampled dense-dense product): a code's gradient from its
        decoded output's gradient. Measured here 1.5× faster than embedding_bag's own backward."""
        row_starts = torch.cat([self.offsets, self.offsets.new_tensor([len(self.latents)])])
        pattern = torch.sparse_csr_tensor(row_starts, self.latents, by_row.new_zeros(len(self.latents)),
                                          (self.batch, self.d_sae), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, by_row, by_latent.t(), beta=0.0).values()


def sparse_pattern(rows: torch.Tensor, latents: torch.Tensor, batch: int, d_sae: int) -> SparsePattern:
    """Pairs (rows ascending) → both orderings; ``rows``/``latents`` are flat int64 tensors."""
    counts = torch.bincount(rows, minlength=batch)
    by_latent = torch.argsort(latents)
    latent_starts = torch.zeros(d_sae + 1, dtype=torch.long, device=latents.device)
    latent_starts[1:] = torch.cumsum(torch.bincount(latents, minlength=d_sae), 0)
    # index_select, not rows[by_latent]: advanced indexing's kernel is ~3x slower on the CPU here.
    return SparsePattern(rows, latents, torch.cumsum(counts, 0) - counts, by_latent, latent_starts,
                         rows.index_select(0, by_latent), batch, d_sae)


def fixed_k_pattern(indices: torch.Tensor, d_sae: int) -> SparsePattern:
    """The pattern of a [B, k] code."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    # contiguous: a broadcast code (the same latents on every row) reshapes to a stride-0 view,
    # which embedding_bag would read wrongly.
    return sparse_pattern(rows, indices.reshape(-1).contiguous(), batch, d_sae)


class _SelectWithSparseGrad(torch.autograd.Function):
    """Attach encoder gradients to pre-activations chosen outside autograd.

    ``values[i] = (x[rows[i]] - b_dec) · W_enc[:, latents[i]] + b_enc[latents[i]]`` was computed
    densely (and chosen by a top-k or a threshold) without a graph; backward builds the gradients of
    W_enc, b_enc and b_dec from the chosen pairs only: O(pairs·d_in), not O(batch·d_sae·d_in).
    """

    @staticmethod
    def forward(ctx, centered_x, W_enc, b_enc, b_dec, values, pattern):
        ctx.save_for_backward(centered_x, W_enc)
        ctx.pattern = pattern
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        centered_x, W_enc = ctx.saved_tensors
        pattern = ctx.pattern
        grad = grad_values.to(centered_x.dtype)
        grad_W_enc = pattern.sum_by_latent(grad, centered_x).t()  # [d_in, d_sae]
        grad_b_enc = torch.zeros(pattern.d_sae, dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, pattern.latents, grad)
        # Σ_i g_i · W_enc[:, latent_i] is W_enc applied to the b_enc gradient; the input was
        # x - b_dec, hence the sign.
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_pairs value · W_dec[latent] per row (+ bias − target): forward with ``embedding_bag``
    and the two in place, so a reconstruction error costs one [batch, d_in] tensor, not three;
    backward gives both gradients by the C kernel where it applies (float32 on the CPU), else the
    values' gradient as a sampled product (on the CPU; elsewhere with embedding_bag's own backward
    kernel) and W_dec's as a latent-major embedding_bag."""

    @staticmethod
    def forward(ctx, values, W_dec, bias, target, pattern):
        on_cpu = W_dec.device.type == "cpu"
        embedding_bag = torch.ops.aten._embedding_bag_forward_only if on_cpu else torch.ops.aten._embedding_bag
        output, offset2bag, _, _ = embedding_bag(W_dec, pattern.latents, pattern.offsets, False, 0, False, values,
                                                 False, -1)
        if bias is not None:
            output.add_(bias)
        if target is not None:
            output.sub_(target)
        ctx.save_for_backward(values, W_dec, None if on_cpu else offset2bag)
        ctx.pattern = pattern
        return output

    @staticmethod
    def backward(ctx, grad_output):
        values, W_dec, offset2bag = ctx.saved_tensors
        pattern = ctx.pattern
        grad_output = grad_output.contiguous()
        grad_bias = grad_output.sum(0) if ctx.needs_input_grad[2] else None
        native = native_decode_backward(grad_output, W_dec, values, pattern)
        if native is not None:
            return native[0], native[1], grad_bias, None, None
        if offset2bag is None:
            grad_values = pattern.pair_dots(grad_output, W_dec)
        else:
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_output, W_dec, pattern.latents, pattern.offsets, offset2bag, 0, -1)
        grad_W_dec = pattern.sum_by_latent(values.to(grad_output.dtype), grad_output)  # [d_sae, d_in]
        return grad_values, grad_W_dec, grad_bias, None, None


@functools.cache
def decode_backward_kernel():
    """train/kernels/decode_backward.c's entry point, or None without it."""
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    return native.kernel("decode_backward", "lexica_decode_backward_f32",
                         (pointer,) * 6 + (int64, int64, pointer, pointer, ctypes.c_int))


def native_decode_backward(grad_output: torch.Tensor, W_dec: torch.Tensor, values: torch.Tensor,
                           pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values' gradient, W_dec's gradient) by the C kernel in one latent-major pass over the
    pairs, for float32 on the CPU; None where it does not apply or is not built."""
    tensors = (grad_output, W_dec, values, pattern.by_latent, pattern.latent_starts, pattern.rows_by_latent)
    if not all(tensor.device.type == "cpu" and tensor.is_contiguous() for tensor in tensors) \
            or not grad_output.dtype == W_dec.dtype == values.dtype == torch.float32:
        return None
    kernel = decode_backward_kernel()
    if kernel is None:
        return None
    grad_values = torch.empty_like(values)
    grad_W_dec = torch.empty_like(W_dec)
    with torch.profiler.record_function("lexica::decode_backward"):
        kernel(*(tensor.data_ptr() for tensor in tensors), pattern.d_sae, W_dec.shape[1], grad_values.data_ptr(),
               grad_W_dec.data_ptr(), torch.get_num_threads())
    return grad_values, grad_W_dec


def select_with_sparse_grad(centered_x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                            b_dec: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """``values`` ([B, k] or flat, in the pattern's pair order) with encoder gradients attached."""
    # Values chosen from lower-precision pre-activations (bf16-mixed) carry on in the input's dtype.
    flat = _SelectWithSparseGrad.apply(centered_x, W_enc, b_enc, b_dec, values.reshape(-1).to(centered_x.dtype),
                                       pattern)
    return flat.view(values.shape)


def sparse_decode(values: torch.Tensor, W_dec: torch.Tensor, pattern: SparsePattern, bias: torch.Tensor | None = None,
                  target: torch.Tensor | None = None) -> torch.Tensor:
    """Training decode of ``values`` ([B, k] or flat) at the pattern's pairs, plus ``bias`` (b_dec)
    and minus ``target`` when given: the reconstruction, or its error against data. ``target``
    gets no gradient."""
    if target is not None and target.requires_grad:
        raise ValueError("sparse_decode's target must be data (it gets no gradient)")
    return _SparseDecode.apply(values.reshape(-1), W_dec, bias, target, pattern)


def decode_code(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Inference decode (without b_dec) of a [B, k] code: Σ_j values[:, j] · W_dec[indices[:, j]]."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
