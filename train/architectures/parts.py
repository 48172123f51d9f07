"""Pieces the architectures share: initialisation, losses, decoder-norm constraints, code shapes."""

from __future__ import annotations

import torch
from torch import nn

from lexica.train.architectures import SparseCode
from lexica.train.shard import Shard, gradient_summed, sum_over_shards, whole
from lexica.train.sparse import SparsePattern, sparse_decode


class Endpoints(nn.Module):
    """Where a dictionary reads and writes, shared by every architecture. An autoencoder reads and
    reconstructs one hook point. A transcoder (``d_out`` given) reads d_in-wide inputs and writes
    d_out-wide outputs of another hook point; a skip-transcoder adds a learned linear path
    (SAELens' ``W_skip [d_out, d_in]``). Its training rows hold [input | target] side by side."""

    def init_weights(self, d_in: int, d_sae: int, seed: int, row_norm: float = 1.0, d_out: int | None = None,
                     skip: bool = False, shard: Shard | None = None) -> None:
        # A shard worker holds only its slice of the latents (d_sae below is the slice's width);
        # its initial weights are exactly that slice of the whole dictionary's.
        self.shard = shard or whole(d_sae)
        rows = (self.shard.start, self.shard.stop)
        self.d_in, self.d_sae = d_in, self.shard.width
        self.transcoder = d_out is not None
        self.d_out = d_out if self.transcoder else d_in
        decoder, encoder = tied_init(d_in, d_sae, seed, row_norm, rows)
        if self.transcoder:  # decoder rows live in the output space: drawn there, not tied to the encoder
            decoder = tied_init(self.d_out, d_sae, seed + 1, row_norm, rows)[0]
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(encoder)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip else None
        if self.transcoder:
            # What the encoder subtracts from its input: an autoencoder's b_dec (input and output
            # share a space); a transcoder's input mean, fixed at initialisation (centred inputs
            # train faster) and folded into b_enc on export (SAELens has no such offset).
            self.register_buffer("input_mean", torch.zeros(d_in))

    @property
    def input_offset(self) -> torch.Tensor:
        return self.input_mean if self.transcoder else self.b_dec

    @property
    def encoder_offset(self) -> torch.Tensor:
        """The input offset as the training encoder uses it: each shard's winners give b_dec a
        different gradient through it, summed over the shard group."""
        return gradient_summed(self.input_offset, self.shard)

    def training_error(self, values: torch.Tensor, pattern: SparsePattern, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """The reconstruction error of target ``y`` from the code ``values`` at ``pattern``'s pairs
        (this shard's; the shards' partial decodes summed), with the skip path from ``x``."""
        if not self.shard.sharded:
            return self.with_skip(sparse_decode(values, self.W_dec, pattern, self.b_dec, target=y), x)
        return self.with_skip(self.summed(sparse_decode(values, self.W_dec, pattern)) + self.b_dec - y, x)

    encoder_budget = 1 << 30  # bytes of dense [rows, d_sae] pre-activations a step may hold (train.encoder_budget_mb)
    compute_dtype = torch.float32  # train.precision bf16-mixed: dense products in bfloat16, fp32 master weights

    def encoder_product(self, centered: torch.Tensor, latents: slice | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """b_enc + centered·W_enc (of ``latents``' columns only, when given) in the compute dtype:
        the dense encoder matmul, the step's one dense product. Differentiable; under bf16-mixed
        its operands are bfloat16 copies of the fp32 weights and its result is bfloat16."""
        bias, weight = (self.b_enc, self.W_enc) if latents is None else (self.b_enc[latents], self.W_enc[:, latents])
        compute = self.compute_dtype
        if compute != centered.dtype and centered.dtype == torch.float32:
            bias, centered, weight = bias.to(compute), centered.to(compute), weight.to(compute)
        return torch.addmm(bias, centered, weight) if out is None else torch.addmm(bias, centered, weight, out=out)

    def decoder_product(self, codes: torch.Tensor) -> torch.Tensor:
        """codes·W_dec for dense codes (ReLU's early steps) in the compute dtype, returned in fp32."""
        if codes.dtype == self.W_dec.dtype:
            return codes @ self.W_dec
        return (codes @ self.W_dec.to(codes.dtype)).float()

    def over_budget(self, rows: int) -> bool:
        return rows * self.d_sae * 4 > self.encoder_budget

    def chunk_rows(self, rows: int) -> int:
        """Rows per encoder chunk within the budget."""
        return max(1, min(rows, self.encoder_budget // (4 * self.d_sae)))

    def summed(self, partial: torch.Tensor) -> torch.Tensor:
        """A quantity each shard holds a part of (a reconstruction, a penalty), summed over the shards."""
        return sum_over_shards(partial, self.shard)

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a training batch."""
        if self.transcoder:
            return batch[:, :self.d_in], batch[:, self.d_in:]
        return batch, batch

    def shifted_target(self, target: torch.Tensor, centered: torch.Tensor) -> torch.Tensor:
        """The target less a constant near its mean, for the loss's variance (``batch_variance``)."""
        return target - self.b_dec.detach() if self.transcoder else centered

    def with_skip(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``output`` plus the skip path's x·W_skipᵀ (nothing without one)."""
        return output if self.W_skip is None else output + torch.nn.functional.linear(x, self.W_skip)

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Inference codes of ``x`` (``encode_rows``, each architecture's own), over row chunks
        within the memory budget: a wide dictionary never holds [rows, d_sae] pre-activations
        larger than ``encoder_budget``."""
        step = self.chunk_rows(len(x))
        if step >= len(x):
            return self.encode_rows(x)
        return joined_codes([self.encode_rows(x[start:start + step]) for start in range(0, len(x), step)])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The dictionary's output for input ``x``: decode(encode(x)), plus the skip path."""
        return self.with_skip(self.decode(self.encode(x)), x)

    @torch.no_grad()
    def initialise_offsets(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b_dec at the target's mean (no early steps spent learning the offset), a transcoder's
        input mean at the input's; returns (input, target)."""
        x, y = self.split(batch)
        self.b_dec.copy_(y.mean(0))
        if self.transcoder:
            self.input_mean.copy_(x.mean(0))
        return x, y


INIT_SKIP_ROWS = 16384  # rows drawn at a time when skipping to a shard's slice: bounded memory


def tied_init(d_in: int, d_sae: int, seed: int, row_norm: float = 1.0,
              rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random decoder rows of norm ``row_norm`` and the encoder as their transpose, so that early
    codes already mean something (Gao et al. 2024; Anthropic's April 2024 update). ``rows``
    (start, stop) draws only that slice: the CPU generator's stream is sequential, so drawing
    and dropping the rows before it gives exactly the whole dictionary's rows."""
    generator = torch.Generator().manual_seed(seed)
    start, stop = rows or (0, d_sae)
    for skipped in range(0, start, INIT_SKIP_ROWS):
        torch.randn(min(INIT_SKIP_ROWS, start - skipped), d_in, generator=generator)
    decoder = torch.randn(stop - start, d_in, generator=generator)
    decoder *= row_norm / decoder.norm(dim=1, keepdim=True)
    return decoder, decoder.t().clone()


class _SumOfSquares(torch.autograd.Function):
    """Σ error² as one dot product, with a one-pass backward (2·g·error). Autograd's pow → sum →
    mean chain allocates and walks a fresh [batch, d_in] tensor at each step, forward and back;
    on a CPU that is a page-faulting first touch of memory every time."""

    @staticmethod
    def forward(ctx, error: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(error)
        flat = error.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (error,) = ctx.saved_tensors
        return error * (2 * grad)


def sum_of_squares(error: torch.Tensor) -> torch.Tensor:
    return _SumOfSquares.apply(error)


@torch.no_grad()
def batch_variance(shifted: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of ‖x − batch mean‖², from ``shifted`` = x − c for any constant c (no
    gradient: targets are data): ‖x − c‖² summed, less B·‖mean − c‖². With c near the mean (the
    centred input x − b_dec) there is little cancellation, and no [batch, d_in] temporary."""
    flat = shifted.reshape(-1)
    mean = shifted.mean(0)
    return torch.dot(flat, flat) - len(shifted) * torch.dot(mean, mean)


def fraction_of_variance_unexplained(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return sum_of_squares(error) / batch_variance(target).clamp_min(1e-12)


def reconstruction_loss(error: torch.Tensor, shifted_target: torch.Tensor,
                        variance: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, batch FVU) of the reconstruction ``error``; ``shifted_target`` is the data less any
    constant (see ``batch_variance``). Given the data's per-token ``variance``, the loss is the
    mean squared error over it: a plain mean over rows, so data-parallel workers averaging
    gradients equal one worker. Without it, the loss is the batch's FVU itself."""
    squared = sum_of_squares(error)
    fvu = squared / batch_variance(shifted_target).clamp_min(1e-12)
    return (fvu, fvu) if variance is None else (squared / (len(error) * variance), fvu.detach())


def firing_counts(latents: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """How many tokens of the batch each latent fired on (value > 0)."""
    return torch.bincount(latents.reshape(-1)[values.reshape(-1) > 0], minlength=d_sae)


@torch.no_grad()
def remove_parallel_gradient(W_dec: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit-norm) decoder row: steps then only rotate rows.
    In place, with no [d_sae, d_in] temporary (row-by-row dot products, then addcmul); vecdot
    rather than a batched matmul, which ran ~3x slower here."""
    if W_dec.grad is not None:
        parallel = torch.linalg.vecdot(W_dec.grad, W_dec).unsqueeze(1)
        W_dec.grad.addcmul_(parallel, W_dec, value=-1)


@torch.no_grad()
def normalise_rows(W_dec: torch.nn.Parameter) -> None:
    W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def padded_code(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, batch: int) -> SparseCode:
    """Flat (row, latent, value) triples, rows ascending, as a [batch, max count] code padded with
    zero values (latent 0), the shape ``SparseCode`` users expect."""
    counts = torch.bincount(rows, minlength=batch)
    width = max(1, int(counts.max())) if len(rows) else 1
    starts = torch.cumsum(counts, 0) - counts
    columns = torch.arange(len(rows), device=rows.device) - starts[rows]
    padded_values = torch.zeros(batch, width, dtype=values.dtype, device=values.device)
    padded_latents = torch.zeros(batch, width, dtype=torch.long, device=latents.device)
    padded_values[rows, columns] = values
    padded_latents[rows, columns] = latents
    return SparseCode(padded_values, padded_latents)


def joined_codes(codes: list[SparseCode]) -> SparseCode:
    """Row chunks' codes as one, each padded with zero values (latent 0) to the widest."""
    width = max(code.values.shape[1] for code in codes)
    values = [torch.nn.functional.pad(code.values, (0, width - code.values.shape[1])) for code in codes]
    indices = [torch.nn.functional.pad(code.indices, (0, width - code.indices.shape[1])) for code in codes]
    return SparseCode(torch.cat(values), torch.cat(indices))


def linear_warmup(step: int, total_steps: int, fraction: float) -> float:
    """0 → 1 over the first ``fraction`` of training (sparsity-coefficient warm-up)."""
    ramp = total_steps * fraction
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


@torch.no_grad()
def active_pairs(dictionary: Endpoints, centered: torch.Tensor, threshold: torch.Tensor | float,
                 near: float = 0.0):
    """(rows ascending, latents, pre-activations) of every pair whose pre-activation is above
    ``threshold`` (or within ``near`` of it), over row chunks within the dictionary's memory
    budget; with ``near``, also each pair's (above, within) flags."""
    found = []
    step = dictionary.chunk_rows(len(centered))
    for start in range(0, len(centered), step):
        pre_activations = dictionary.encoder_product(centered[start:start + step])
        above = pre_activations > threshold
        close = (pre_activations - threshold).abs() < near if near else above
        rows, latents = (above | close).nonzero(as_tuple=True) if near else above.nonzero(as_tuple=True)
        found.append((rows + start, latents, pre_activations[rows, latents], above[rows, latents],
                      close[rows, latents]))
    # One chunk (a batch within the budget, the usual case) is returned as is: no copy.
    columns = found[0] if len(found) == 1 else [torch.cat(column) for column in zip(*found, strict=True)]
    rows, latents, values, pair_above, pair_close = columns
    return (rows, latents, values, pair_above, pair_close) if near else (rows, latents, values)


def threshold_code(pre_activations: torch.Tensor, threshold: torch.Tensor | float) -> SparseCode:
    """Inference codes of threshold architectures: every pre-activation above its threshold."""
    rows, latents = (pre_activations > threshold).nonzero(as_tuple=True)
    return padded_code(rows, latents, pre_activations[rows, latents], len(pre_activations))
