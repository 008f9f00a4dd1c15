"""Sparse autograd functions for the TopK SAE training step.

The only dense work in a TopK SAE step is the encoder GEMM [B, d] x [d, n] and the top-k
over its output (PAPER.md, "Kernels"). Everything downstream touches k (or k_aux) latents
per token, so these functions never build a dense [B, n] tensor:

- ``sparse_encode``: the selected pre-activations as a function of (x, W_enc, b_enc). The
  values were already computed by the no-grad GEMM; backward scatters the gradient into
  the selected encoder rows only and gathers k rows for the input gradient.
- ``sparse_decode``: sum_j v_j W_dec[i_j] per token. Forward is an embedding_bag; backward
  needs k dot products per token for the values and a scatter into k rows for W_dec.

Weights are stored as [num_latents, d_in] (one row per latent) so that "the rows of the
selected latents" is a cheap index on the first dimension.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR path below is exercised against a dense reference in tests/test_kernels.py.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Tokens per chunk when a [chunk, k, d] intermediate is materialised; keeps it in cache.
_CHUNK = 256


def _csr_pattern(indices: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Transpose of the [B, num_rows] selection pattern as CSR: (crow, token of each nnz, order)."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=num_rows).cumsum(0)
    return crow, order // k, order


def scatter_outer(indices: Tensor, weights: Tensor, x: Tensor, num_rows: int) -> Tensor:
    """Dense [num_rows, d] = sum over (b, j) of weights[b, j] * x[b] added into row indices[b, j].

    This is G^T X for a [B, num_rows] matrix G with the given sparsity pattern, i.e. the
    weight gradient of a layer whose output only depends on the selected rows.
    """
    B, k = indices.shape
    d = x.shape[1]
    weights = weights.to(x.dtype)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        # CSR spmm (MKL): no [B*k, d] outer products materialised.
        crow, cols, order = _csr_pattern(indices, num_rows)
        g = torch.sparse_csr_tensor(
            crow, cols, weights.reshape(-1)[order], size=(num_rows, B), check_invariants=False
        )
        return g @ x
    out = torch.zeros(num_rows, d, dtype=x.dtype, device=x.device)
    chunk = max(1, (_CHUNK * 32) // max(k, 1))
    for s in range(0, B, chunk):
        w = weights[s : s + chunk]
        outer = (w.unsqueeze(-1) * x[s : s + chunk].unsqueeze(1)).reshape(-1, d)
        out.index_add_(0, indices[s : s + chunk].reshape(-1), outer)
    return out


def gather_dot(indices: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """[B, k]: <rows[indices[b, j]], y[b]> — k dot products per token."""
    B, k = indices.shape
    if y.device.type == "cpu" and y.dtype == rows.dtype and y.dtype in (torch.float32, torch.float64):
        # Sampled dense-dense matmul on the selection pattern (CSR rows need sorted columns).
        sorted_idx, perm = indices.sort(dim=1)
        crow = torch.arange(0, B * k + 1, k, device=y.device)
        pattern = torch.sparse_csr_tensor(
            crow, sorted_idx.reshape(-1), torch.zeros(B * k, dtype=y.dtype), size=(B, rows.shape[0]),
            check_invariants=False,
        )
        vals = torch.sparse.sampled_addmm(pattern, y, rows.t(), beta=0.0).values().view(B, k)
        return torch.empty_like(vals).scatter_(1, perm, vals)
    out = torch.empty(B, k, dtype=y.dtype, device=y.device)
    chunk = max(1, (_CHUNK * 32) // max(k, 1))
    for s in range(0, B, chunk):
        r = rows[indices[s : s + chunk]].to(y.dtype)  # [c, k, d]
        out[s : s + chunk] = torch.bmm(r, y[s : s + chunk].unsqueeze(-1)).squeeze(-1)
    return out


def gather_sum(indices: Tensor, weights: Tensor, rows: Tensor) -> Tensor:
    """[B, d]: sum_j weights[b, j] * rows[indices[b, j]]."""
    return F.embedding_bag(indices, rows, per_sample_weights=weights.to(rows.dtype), mode="sum")


class SparseEncode(torch.autograd.Function):
    """values[b, j] = <W_enc[i_bj], x[b]> + b_enc[i_bj], given precomputed values.

    The caller computes all pre-activations with one no-grad GEMM (needed anyway for the
    top-k) and passes the selected ones here; this function only supplies the sparse
    backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor):
        ctx.save_for_backward(x, W_enc, indices)
        ctx.num_latents = W_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = gather_sum(indices, grad, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gW = scatter_outer(indices, grad, x.to(W_enc.dtype), ctx.num_latents)
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(ctx.num_latents, dtype=W_enc.dtype, device=W_enc.device)
            gb.index_add_(0, indices.reshape(-1), grad.reshape(-1).to(W_enc.dtype))
        return gx, gW, gb, None, None


class SparseDecode(torch.autograd.Function):
    """out[b] = sum_j values[b, j] * W_dec[i_bj]  (no bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor):
        ctx.save_for_backward(values, indices, W_dec)
        return gather_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        gv = gW = None
        if ctx.needs_input_grad[0]:
            gv = gather_dot(indices, W_dec, grad).to(values.dtype)
        if ctx.needs_input_grad[2]:
            gW = scatter_outer(indices, values, grad.to(W_dec.dtype), W_dec.shape[0])
        return gv, None, gW


def sparse_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    return SparseEncode.apply(x, W_enc, b_enc, indices, values)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    return SparseDecode.apply(values, indices, W_dec)


def subset_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, rows: Tensor, local_idx: Tensor, values: Tensor) -> Tensor:
    """Dense [B, m] block of the latents ``rows``: ReLU(values) at ``local_idx``, 0 elsewhere.

    ``values`` are the pre-activations <W_enc[rows[l]], x> + b_enc[rows[l]] at the selected
    local positions. Used for AuxK when the dead latents are few enough that a dense
    [B, m] block beats gathers (m = number of dead latents, not n). Gradients land only in
    the selected, positive entries and hence only in ``rows``.
    """
    return _SubsetEncode.apply(x, W_enc, b_enc, rows, local_idx, values)


class _SubsetEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, rows, local_idx, values):
        dense = torch.zeros(x.shape[0], rows.numel(), dtype=values.dtype, device=values.device)
        dense.scatter_(1, local_idx, values.relu())
        ctx.save_for_backward(x, W_enc, rows, dense > 0)
        return dense

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, rows, keep = ctx.saved_tensors
        grad = grad * keep
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ W_enc[rows].to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gW = torch.zeros_like(W_enc)
            gW[rows] = (grad.t() @ x.to(grad.dtype)).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
            gb[rows] = grad.sum(0).to(W_enc.dtype)
        return gx, gW, gb, None, None, None
