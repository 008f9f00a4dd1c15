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

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lit.model import losses, native

# The CSR path below is exercised against a dense reference in tests/test_kernels.py.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Tokens per chunk when a [chunk, k, d] intermediate is materialised: on CPU small enough
# to stay in cache (256 tokens at k = 32); on GPUs large, since each chunk costs a few
# kernel launches and B is ~100k tokens there (a 256-token chunk would mean ~500 rounds of
# launches per call, several times the encoder GEMM).
_CHUNK = 256
_GPU_CHUNK_BYTES = 256 << 20


def _chunk_tokens(k: int, d: int, t: Tensor) -> int:
    if t.device.type == "cpu":
        return max(1, (_CHUNK * 32) // max(k, 1))
    return max(1, _GPU_CHUNK_BYTES // max(1, k * d * t.element_size()))


def _csr_on(t: Tensor) -> bool:
    """Whether the CSR (MKL / cuSPARSE) paths serve this tensor. Always on CPU for float32 /
    float64. On CUDA only with SAE_LIT_CUDA_SPARSE=csr: cuSPARSE SpMM / SDDMM avoid the
    chunked path's [chunk * k, d] outer products, but are not yet measured against it on a
    GPU (benchmarks/gpu_check.sh times both)."""
    if t.device.type == "cpu":
        return t.dtype in (torch.float32, torch.float64)
    return (t.device.type == "cuda" and os.environ.get("SAE_LIT_CUDA_SPARSE", "chunked") == "csr"
            and t.dtype in (torch.float32, torch.float64))


def _bucket_order(flat: Tensor, num_rows: int) -> Tensor:
    """A permutation that groups equal ids in [0, num_rows) together (stable).

    On CPU, torch's sort of B*k ids with many repeats is a comparison sort that costs more
    than the whole sparse backward (hundreds of ms at B*k = 131k); numpy's stable sort of
    16-bit keys is a radix sort, O(B*k). Ids past 16 bits take two stable passes (low
    half, then high half): least-significant-digit radix sort."""
    if flat.device.type != "cpu":
        return torch.argsort(flat, stable=True)
    ids = flat.numpy()
    if num_rows <= 1 << 16:
        return torch.from_numpy(np.argsort(ids.astype(np.uint16), kind="stable"))
    low = np.argsort((ids & 0xFFFF).astype(np.uint16), kind="stable")
    high = np.argsort((ids[low] >> 16).astype(np.uint16 if num_rows <= 1 << 32 else np.int64), kind="stable")
    return torch.from_numpy(low[high])


def _csr_pattern(indices: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Transpose of the [B, num_rows] selection pattern as CSR: (crow, token of each nnz, order)."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = _bucket_order(flat, num_rows)
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
    if _csr_on(x):
        # CSR spmm (MKL / cuSPARSE): no [B*k, d] outer products materialised.
        crow, cols, order = _csr_pattern(indices, num_rows)
        g = torch.sparse_csr_tensor(
            crow, cols, weights.reshape(-1)[order], size=(num_rows, B), check_invariants=False
        )
        # beta=0 into an uninitialised buffer: `g @ x` would zero-fill and copy a dense
        # [num_rows, d] result first, costing twice the spmm itself.
        out = torch.empty(num_rows, d, dtype=x.dtype, device=x.device)
        return torch.addmm(out, g, x, beta=0.0, out=out)
    out = torch.zeros(num_rows, d, dtype=x.dtype, device=x.device)
    chunk = _chunk_tokens(k, d, x)
    for s in range(0, B, chunk):
        w = weights[s : s + chunk]
        outer = (w.unsqueeze(-1) * x[s : s + chunk].unsqueeze(1)).reshape(-1, d)
        out.index_add_(0, indices[s : s + chunk].reshape(-1), outer)
    return out


def gather_dot(indices: Tensor, rows: Tensor, y: Tensor) -> Tensor:
    """[B, k]: <rows[indices[b, j]], y[b]> — k dot products per token."""
    B, k = indices.shape
    out = native.gather_dot(indices, rows, y)  # float32 CPU: one pass over the selected rows
    if out is not None:
        return out
    if _csr_on(y) and y.dtype == rows.dtype:
        # Sampled dense-dense matmul on the selection pattern (CSR rows need sorted columns).
        # numpy's row sort is ~25x faster than torch's for short rows on CPU.
        if y.device.type == "cpu":
            perm_np = np.argsort(indices.numpy(), axis=1)
            perm = torch.from_numpy(perm_np)
            sorted_idx = torch.from_numpy(np.take_along_axis(indices.numpy(), perm_np, axis=1))
        else:
            sorted_idx, perm = indices.sort(dim=1)
        crow = torch.arange(0, B * k + 1, k, device=y.device)
        pattern = torch.sparse_csr_tensor(
            crow, sorted_idx.reshape(-1), torch.zeros(B * k, dtype=y.dtype, device=y.device),
            size=(B, rows.shape[0]), check_invariants=False,
        )
        vals = torch.sparse.sampled_addmm(pattern, y, rows.t(), beta=0.0).values().view(B, k)
        return torch.empty_like(vals).scatter_(1, perm, vals)
    out = torch.empty(B, k, dtype=y.dtype, device=y.device)
    chunk = _chunk_tokens(k, y.shape[1], y)
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


class TopKTrainStep(torch.autograd.Function):
    """The whole differentiable part of a TopK SAE training forward, with one fused backward.

    Inputs are the parameters plus what the no-grad GEMM + top-k already selected. Outputs:
    the k-sparse reconstruction, the Multi-TopK reconstruction from all selected latents
    (empty when off) and the AuxK reconstruction of the dead latents (empty when off).
    Doing the backward by hand lets every weight gradient be written into one buffer per
    parameter (the AuxK rows added in place) instead of autograd allocating, zero-filling
    and summing a dense [n, d] gradient per use, and gives b_dec's gradient through the
    encoder as one GEMV instead of a [B, d] gather. The input x_c is treated as data.

    Latent-sharded (sae_lit.model.sharded): the weights are this shard's rows, the selection
    holds only this shard's latents (the others at value 0), and ``reduce`` sums a list of
    tensors in place over the shards. It completes the partial decodes before b_dec is added
    and, in backward, b_dec's gradient through the encoder; what reaches b_dec through the
    decodes is the same on every shard and is not summed.
    """

    @staticmethod
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, x_c, top_i, top_v, k: int, multi: bool,
                dead_rows, aux_local, aux_v, aux_z, aux_dtype: torch.dtype | None = None, reduce=None):
        """AuxK comes either as ``aux_z``, the dense [B, n_dead] block of ReLU'd top-k_aux
        pre-activations of the latents ``dead_rows`` (GEMMs), or as ``aux_local`` /
        ``aux_v`` [B, k_aux], positions in ``dead_rows`` and pre-activations (gathers)."""
        ctx.set_materialize_grads(False)
        v = top_v.relu()
        recon_k = gather_sum(top_i[:, :k], v[:, :k], W_dec)
        empty = recon_k.new_empty(0)
        # Multi-TopK: the 4k-latent reconstruction is the k-latent one plus the other 3k.
        recon_all = gather_sum(top_i[:, k:].contiguous(), v[:, k:].contiguous(), W_dec) if multi else empty
        aux_hat, z, W_dead = empty, None, None
        aux_dense = dead_rows is not None and aux_z is not None
        if aux_dense:
            # aux_dtype (e.g. bf16) runs AuxK's four [B, n_dead] GEMMs in lower precision
            # with fp32 accumulation; the main loss is unaffected. Under autocast they run in
            # its dtype, backward included (autocast itself would leave this hand-written
            # backward in fp32: 3 of the 4 GEMMs, several times the encoder GEMM on a GPU).
            dev = aux_z.device.type
            dt = aux_dtype or (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else aux_z.dtype)
            z = aux_z.to(dt)
            W_dead = W_dec[dead_rows].to(dt)
            aux_hat = (z @ W_dead).to(W_dec.dtype)
        elif dead_rows is not None:
            z = aux_v.relu()
            aux_hat = gather_sum(dead_rows[aux_local], z, W_dec)
        if reduce is not None:
            reduce([t for t in (recon_k, recon_all, aux_hat) if t.numel()])
        recon_k.add_(b_dec)
        if multi:
            recon_all.add_(recon_k)
        ctx.k, ctx.multi, ctx.aux_dense, ctx.reduce = k, multi, aux_dense, reduce
        ctx.save_for_backward(W_enc, W_dec, x_c, top_i, top_v, dead_rows, aux_local, aux_v, z, W_dead)
        return recon_k, recon_all, aux_hat

    @staticmethod
    def backward(ctx, g_k, g_all, g_aux):
        W_enc, W_dec, x_c, top_i, top_v, dead_rows, aux_local, aux_v, z, W_dead = ctx.saved_tensors
        k, n = ctx.k, W_enc.shape[0]
        v = top_v.relu()
        # d loss / d latent values of the main code
        g_v = torch.zeros_like(top_v)
        gW_dec = None
        gb_dec = torch.zeros_like(x_c[0])
        multi = ctx.multi and g_all is not None
        # The first k latents decode into both reconstructions: their gradient is that of
        # g_k + g_all, so each selected latent takes one dot product and one scatter.
        g_first = g_k if not multi else g_all if g_k is None else g_k + g_all
        if g_first is not None:
            g_v[:, :k] = gather_dot(top_i[:, :k], W_dec, g_first)
            gW_dec = scatter_outer(top_i[:, :k], v[:, :k], g_first, n)
            gb_dec += g_first.sum(0)
        if multi and top_i.shape[1] > k:
            rest_i = top_i[:, k:].contiguous()
            g_v[:, k:] = gather_dot(rest_i, W_dec, g_all)
            gW_dec.add_(scatter_outer(rest_i, v[:, k:].contiguous(), g_all, n))
        g_v.masked_fill_(top_v <= 0, 0.0)
        gW_enc = scatter_outer(top_i, g_v, x_c, n)
        gb_enc = torch.zeros(n, dtype=W_enc.dtype, device=W_enc.device)
        gb_enc.index_add_(0, top_i.reshape(-1), g_v.reshape(-1))
        if gW_dec is None:
            gW_dec = torch.zeros_like(W_dec)
        if g_aux is not None and dead_rows is not None:
            # AuxK trains the dead latents' rows, and b_dec (the paper's b_pre) as in the
            # reference code: its decode includes b_pre (against a target holding a detached
            # b_pre), and its encoder reads x - b_pre. Live latents get nothing.
            gb_dec += g_aux.sum(0, dtype=gb_dec.dtype)
            if ctx.aux_dense:
                dt = z.dtype
                g_aux = g_aux.to(dt)
                # z >= 0 (ReLU'd): its zeros are the entries AuxK did not keep (or kept at 0).
                g_z = native.mask_nonpositive_(g_aux @ W_dead.t(), z)
                gW_dec.index_add_(0, dead_rows, (z.t() @ g_aux).to(gW_dec.dtype))
                gW_enc.index_add_(0, dead_rows, (g_z.t() @ x_c.to(dt)).to(gW_enc.dtype))
                gb_enc.index_add_(0, dead_rows, g_z.sum(0, dtype=gb_enc.dtype))
            else:
                idx = dead_rows[aux_local]
                g_z = gather_dot(idx, W_dec, g_aux).masked_fill_(aux_v <= 0, 0.0)
                gW_dec += scatter_outer(idx, z, g_aux, n)
                gW_enc += scatter_outer(idx, g_z, x_c, n)
                gb_enc.index_add_(0, idx.reshape(-1), g_z.reshape(-1))
        # pre = W_enc (x - b_dec) + b_enc: sum_{b,j} g_bj W_enc[i_bj] = (per-latent sums) @ W_enc,
        # the main code's and AuxK's latents alike.
        through_encoder = gb_enc @ W_enc
        if ctx.reduce is not None:
            ctx.reduce([through_encoder])
        gb_dec -= through_encoder
        return gW_enc, gb_enc, gW_dec, gb_dec, None, None, None, None, None, None, None, None, None, None, None


class ReconLosses(torch.autograd.Function):
    """The training losses of a batch from its reconstructions, with a hand-written backward.

    Returns (nmse, multi_topk_nmse, auxk) with the values of ``losses.nmse`` of recon_k and
    of recon_all (0 when recon_all is empty) and ``losses.auxk_loss`` of aux_hat against
    the detached residual x_n - recon_k (0 when aux_hat is empty, and 0 with a zero gradient
    when it is not finite). ``x_n`` and ``denom``
    (its total variance) are data. Autograd through the generic formulas spends about ten
    [B, d] elementwise passes on these; here each error is formed once, reduced with a dot
    product, and scaled once in backward.
    """

    @staticmethod
    def forward(ctx, x_n, denom, recon_k, recon_all, aux_hat):
        ctx.set_materialize_grads(False)
        tiny = torch.finfo(denom.dtype).tiny
        den = denom.clamp_min(tiny)
        zero = den.new_zeros(())
        e_k = recon_k - x_n
        nmse = torch.dot(e_k.reshape(-1), e_k.reshape(-1)) / den
        e_all = aux_err = c_aux = None
        multi = auxk = zero
        if recon_all.numel():
            e_all = recon_all - x_n
            multi = torch.dot(e_all.reshape(-1), e_all.reshape(-1)) / den
        if aux_hat.numel():
            # residual = x_n - recon_k = -e_k; its total variance is e_k's.
            den_aux = losses.total_variance(e_k).clamp_min(tiny)
            aux_err = aux_hat + e_k  # aux_hat - residual
            loss = torch.dot(aux_err.reshape(-1), aux_err.reshape(-1)) / den_aux
            finite = torch.isfinite(loss)  # no host sync: a non-finite loss becomes 0, no gradient
            auxk = torch.where(finite, loss, zero)
            c_aux = torch.where(finite, 2 / den_aux, zero)
            # aux_err * 0 is NaN where aux_err is not finite: zero the error itself.
            aux_err = torch.where(finite, aux_err, zero)
        ctx.save_for_backward(e_k, e_all, aux_err, den, c_aux)
        return nmse, multi, auxk

    @staticmethod
    def backward(ctx, g_nmse, g_multi, g_aux):
        e_k, e_all, aux_err, den, c_aux = ctx.saved_tensors
        g_k = g_all = g_hat = None
        if g_nmse is not None:
            g_k = e_k * (2 * g_nmse / den)
        if g_multi is not None and e_all is not None:
            g_all = e_all * (2 * g_multi / den)
        if g_aux is not None and aux_err is not None:
            g_hat = aux_err * (c_aux * g_aux)
        return None, None, g_k, g_all, g_hat


class StepBuffer:
    """The reused [B, n] CPU buffer for the training step's encoder GEMM output.

    A fresh [B, n] result costs ~20% of the GEMM in page faults on CPU; CUDA's caching
    allocator has no such cost, and autocast does not allow out=. Not a module buffer: it is
    scratch space, never saved, and ``release`` frees it (SAEModule does around validation and
    at the end of training, so that evaluation does not hold it next to its own).
    """

    def __init__(self):
        self._buf: Tensor | None = None

    def get(self, batch: int, n: int, dtype: torch.dtype) -> Tensor:
        buf = self._buf
        if buf is None or buf.shape != (batch, n) or buf.dtype != dtype:
            buf = self._buf = torch.empty(batch, n, dtype=dtype)
        return buf

    def release(self) -> None:
        self._buf = None


def dense_pre_acts(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, buffer: StepBuffer | None = None) -> Tensor:
    """W_enc x_c + b_enc for all latents: [B, n], into ``buffer`` on CPU outside autocast."""
    if buffer is None or x_c.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return torch.addmm(b_enc, x_c, W_enc.t())
    return torch.addmm(b_enc, x_c, W_enc.t(), out=buffer.get(x_c.shape[0], W_enc.shape[0], x_c.dtype))


@torch.no_grad()
def encoder_gemm(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, buffer: StepBuffer) -> tuple[Tensor, Tensor | None]:
    """(pre, bias): the training step's one dense GEMM, for its selections (no grad).

    With the native CPU kernels the bias is left out of the [B, n] result (``bias`` = b_enc,
    added by the selection kernels on the fly), which saves a broadcast pass over the whole
    output; otherwise pre = W_enc x_c + b_enc and ``bias`` is None.
    """
    if x_c.device.type != "cpu" or W_enc.dtype != torch.float32 or not native.available():
        return dense_pre_acts(x_c, W_enc, b_enc, buffer), None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return dense_pre_acts(x_c, W_enc, b_enc, buffer), None
        dt = torch.bfloat16  # what autocast would run the GEMM in (AMX on recent Xeons)
    elif x_c.dtype == torch.float32:
        dt = torch.float32
    else:
        return dense_pre_acts(x_c, W_enc, b_enc, buffer), None
    buf = buffer.get(x_c.shape[0], W_enc.shape[0], dt)
    with torch.autocast("cpu", enabled=False):  # autocast refuses out=; cast by hand instead
        torch.mm(x_c.detach().to(dt), W_enc.detach().to(dt).t(), out=buf)
    return buf, b_enc.detach()
