"""The TopK SAE with its latents split over a process group (PAPER.md, "Scaling out").

Shard s of P holds latents [s n/P, (s+1) n/P): their encoder rows, encoder biases and decoder
rows (and, in the training module, their dead counters and Adam moments). b_dec (the
paper's b_pre) and the normalisation constant are replicated. A training step:

1. the encoder GEMM over the local rows only: [B, n/P] pre-activations;
2. a sharded top-k: each shard's local top candidates (value, global id) are all-gathered
   and every shard takes the same top k of them, in two rounds (``sharded_topk``): exactly
   the top k of the whole row, and exactly k entries even with ties, unlike keeping every
   local value at or above the global k-th;
3. AuxK's top-k_aux over the dead latents the same way, after this batch's firings are taken
   out of the dead set (as sae.TopKSAE does);
4. each shard decodes its own selected latents; the partial reconstructions are all-reduced
   before b_dec is added, so the losses and their gradients are the same on every shard;
5. backward: each shard's weight gradients are local; b_dec's gradient through the encoder
   is all-reduced (through the decodes it is already the same everywhere).

Gradient projection and decoder renormalisation are per row, hence per shard. Data
parallelism (replicas of each shard) is the training module's business, not this module's.
With one shard this computes what TopKSAE computes (tests/test_latent_parallel.py).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_lit.model import kernels, losses, native
from sae_lit.model.sae import EncoderOutput, ForwardOutput, SAEConfig, TopKSAE, init_rows


class LatentComm:
    """The process group the latents are split over, and this process's shard in it.

    ``group`` None with ``size`` > 1 is a detached shard (e.g. one file of a sharded
    checkpoint, read for export): it holds its rows but cannot run the collectives."""

    def __init__(self, group: dist.ProcessGroup | None = None, rank: int = 0, size: int = 1):
        if not 0 <= rank < size:
            raise ValueError(f"shard rank {rank} is outside [0, {size})")
        self.group, self.rank, self.size = group, rank, size

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> "LatentComm":
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def __deepcopy__(self, memo) -> "LatentComm":
        return self  # a process group is a handle, shared by copies of a module (the EMA)

    def _check(self) -> bool:
        if self.size == 1:
            return False
        if self.group is None:
            raise RuntimeError(f"shard {self.rank} of {self.size} is detached (no process group): it cannot communicate")
        return True

    def all_reduce_(self, tensors: list[Tensor], op=dist.ReduceOp.SUM) -> None:
        """In place over the shards; several tensors of one dtype go in one call."""
        if not self._check() or not tensors:
            return
        if len(tensors) == 1:
            dist.all_reduce(tensors[0], op=op, group=self.group)
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=op, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def all_gather(self, t: Tensor) -> Tensor:
        """[size, *t.shape]: every shard's t."""
        if not self._check():
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


# Candidates a shard sends in the first round of the sharded top-k: its top ceil(c k / P) + 4
# (the reference code's capacity c, plus slack), not k. A token's top k rarely has more than
# that many on one shard; when it might, the second round settles it exactly.
CAPACITY, AUX_CAPACITY, SLACK = 4.0, 2.0, 4


def first_round(k: int, shards: int, capacity: float) -> int:
    return min(k, math.ceil(max(capacity, 1.0) * k / shards) + SLACK)  # P c >= k: a top k exists


def sharded_topk(src: Tensor, k: int, comm: LatentComm, ids: Tensor, cols: Tensor | None = None,
                 bias: Tensor | None = None, capacity: float = CAPACITY) -> tuple[Tensor, Tensor]:
    """The top k of the row-wise union over shards of ``src + bias`` (columns ``cols`` only,
    if given): (values [B, k] sorted descending, global ids [B, k]) - the same on every shard.

    ``ids`` [src.shape[1]] are the global ids of src's columns. Callers ask for at most as
    many as exist over all shards.

    Round 1: every shard sends its top c = first_round(k, P, capacity) candidates (value,
    global id) and all take the top k of the P c gathered, with k-th value t. A shard whose
    c-th candidate is below t sent everything it has at or above t, so if that holds on every
    shard the answer is exact. Round 2, only for the tokens where some shard's c-th candidate
    reaches t: every shard sends its top k for those tokens (the top k has at most k entries
    on one shard), and their answer is recomputed. Exactly k entries even with ties, unlike
    keeping every local value at or above the k-th.
    """
    n_cols = src.shape[1] if cols is None else cols.numel()
    kk = min(k, n_cols)
    B = src.shape[0]
    if kk == 0:
        v = torch.empty(B, 0, dtype=src.dtype if bias is None else torch.promote_types(src.dtype, bias.dtype),
                        device=src.device)
        gid = torch.empty(B, 0, dtype=torch.int64, device=src.device)
    elif cols is None:
        v, pos = native.topk(src, kk, bias=bias)  # sorted
        gid = ids[pos]
    else:
        _, v, pos = native.aux_select(src, cols, kk, dense=False, bias=bias)
        v, order = v.sort(dim=1, descending=True)
        gid = ids[cols[pos.gather(1, order)]]
    if comm.size == 1:
        return v, gid
    c = first_round(k, comm.size, capacity)
    top_v, top_id = _gathered_topk(v[:, :c], gid[:, :c], c, k, comm)
    if c == k:
        return top_v, top_id
    unsure = (v[:, c - 1] >= top_v[:, k - 1]).to(torch.int32) if kk > c else torch.zeros(B, dtype=torch.int32,
                                                                                       device=v.device)
    comm.all_reduce_([unsure], op=dist.ReduceOp.MAX)
    rows = unsure.nonzero().squeeze(1)
    if rows.numel():
        top_v[rows], top_id[rows] = _gathered_topk(v[rows], gid[rows], k, k, comm)
    return top_v, top_id


def _gathered_topk(v: Tensor, gid: Tensor, width: int, k: int, comm: LatentComm) -> tuple[Tensor, Tensor]:
    """Top k of every shard's candidates (padded to ``width`` with -inf, id -1: on no shard)."""
    B, have = v.shape
    if have < width:
        v = torch.cat([v, v.new_full((B, width - have), -math.inf)], 1)
        gid = torch.cat([gid, gid.new_full((B, width - have), -1)], 1)
    all_v = comm.all_gather(v).permute(1, 0, 2).reshape(B, -1)
    all_id = comm.all_gather(gid).permute(1, 0, 2).reshape(B, -1)
    top_v, at = all_v.topk(k, dim=1)  # the same inputs on every shard: the same choice
    return top_v, all_id.gather(1, at)


class ShardedTopKSAE(nn.Module):
    """A latent shard of a TopK SAE (see the module docstring). Built from the same
    SAEConfig as TopKSAE; its rows equal rows [lo, hi) of ``TopKSAE(cfg)``'s, and
    ``ShardedTopKSAE.from_full`` cuts an existing one. The inference API (encode, decode,
    encode_decode, reconstruct) returns the whole SAE's answer on every shard, with global
    latent ids; it is a collective, so every shard of the group must call it."""

    # What does not depend on the latents is TopKSAE's own code.
    d_in = TopKSAE.d_in
    num_latents = TopKSAE.num_latents
    k = TopKSAE.k
    activation = TopKSAE.activation
    normalize = TopKSAE.normalize
    multi_topk = TopKSAE.multi_topk
    auxk_bf16 = TopKSAE.auxk_bf16
    k_aux = TopKSAE.k_aux
    weights = TopKSAE.weights
    normalize_input = TopKSAE.normalize_input
    denormalize = TopKSAE.denormalize
    reconstruct = TopKSAE.reconstruct
    release_buffers = TopKSAE.release_buffers
    set_decoder_norm_to_unit_norm = TopKSAE.set_decoder_norm_to_unit_norm
    remove_gradient_parallel_to_decoder_directions = TopKSAE.remove_gradient_parallel_to_decoder_directions
    init_from_data = TopKSAE.init_from_data

    def __init__(self, cfg: SAEConfig, comm: LatentComm, device: torch.device | str | None = None,
                 rows: tuple[Tensor, Tensor] | None = None):
        """This shard of ``TopKSAE(cfg)``; ``rows`` = (W_dec, W_enc) [num_latents / shards, d_in]
        to take instead of drawing the init (e.g. empty ones, to load a state dict into)."""
        super().__init__()
        if cfg.d_in <= 0:
            raise ValueError(f"d_in must be positive, got {cfg.d_in}")
        if cfg.activation != "topk":
            raise ValueError(f"latent sharding supports activation='topk' only, got {cfg.activation!r}")
        if cfg.num_latents % comm.size:
            raise ValueError(
                f"num_latents={cfg.num_latents} does not split evenly over {comm.size} latent shards; "
                f"choose a multiple of {comm.size}"
            )
        self.cfg, self.comm = cfg, comm
        self.num_local = cfg.num_latents // comm.size
        self.lo = comm.rank * self.num_local
        self.hi = self.lo + self.num_local
        # Drawn straight to ``device`` chunk by chunk: the host never holds the shard either.
        W_dec, W_enc = rows if rows is not None else init_rows(cfg, self.lo, self.hi, device)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc)
        like = dict(dtype=W_dec.dtype, device=W_dec.device)
        self.b_enc = nn.Parameter(torch.zeros(self.num_local, **like))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **like))
        self.register_buffer("input_scale", torch.tensor(1.0, **like))
        self.register_buffer("initialized", torch.tensor(False, device=W_dec.device))
        self.act = None
        self.step_buffer = kernels.StepBuffer()

    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: TopKSAE, comm: LatentComm) -> "ShardedTopKSAE":
        """This shard's slice of a whole SAE (weights, biases, scale, init flag)."""
        n_local = sae.num_latents // comm.size
        lo, hi = comm.rank * n_local, (comm.rank + 1) * n_local
        out = cls(sae.cfg, comm, rows=(sae.W_dec[lo:hi].detach().clone(), sae.W_enc[lo:hi].detach().clone()))
        out.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)  # the float buffers too (input_scale)
        out.b_enc.copy_(sae.b_enc[lo:hi])
        out.b_dec.copy_(sae.b_dec)
        out.input_scale.copy_(sae.input_scale)
        out.initialized.copy_(sae.initialized)
        return out

    def extra_repr(self) -> str:
        return f"latents [{self.lo}, {self.hi}) of {self.num_latents}, shard {self.comm.rank} of {self.comm.size}"

    def _ids(self, device) -> Tensor:
        return torch.arange(self.lo, self.hi, device=device)

    def _localize(self, values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """This shard's entries of a global selection as (local rows, values); the others
        become row 0 at value 0, which decodes to nothing and takes no gradient."""
        mine = (ids >= self.lo) & (ids < self.hi)
        return torch.where(mine, ids - self.lo, 0), torch.where(mine, values, 0)

    # ---------------------------------------------------------------- inference API
    def _encode_norm(self, x_norm: Tensor, k: int | None) -> EncoderOutput:
        x_c = x_norm - self.b_dec.to(x_norm.dtype)
        pre = torch.addmm(self.b_enc.to(x_c.dtype), x_c, self.W_enc.t().to(x_c.dtype))
        v, i = sharded_topk(pre, k or self.k, self.comm, self._ids(pre.device))
        return EncoderOutput(v.relu(), i)

    @torch.no_grad()
    def encode(self, x: Tensor, k: int | None = None) -> EncoderOutput:
        """Raw activations [B, d_in] -> (values, global latent ids), each [B, k]."""
        x_norm, _ = self.normalize_input(x)
        return self._encode_norm(x_norm, k)

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """(values, global ids) -> reconstruction in the normalised space (see TopKSAE.decode)."""
        rows, vals = self._localize(values, indices)
        out = kernels.gather_sum(rows, vals, self.W_dec)
        self.comm.all_reduce_([out])
        return out + self.b_dec

    @torch.no_grad()
    def encode_decode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, EncoderOutput]:
        x_norm, stats = self.normalize_input(x)
        latents = self._encode_norm(x_norm, k)
        return self.denormalize(self.decode(*latents), stats), latents

    # ---------------------------------------------------------------- training forward
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, diagnose: bool = False) -> ForwardOutput:
        """As TopKSAE.forward; ``dead_mask`` [num_local] covers this shard's latents. The
        outputs are the whole SAE's: values and global ids of the top k, losses, margin."""
        if x.requires_grad:
            raise NotImplementedError("a latent-sharded SAE has no gradient with respect to its input")
        x_norm, stats = self.normalize_input(x)
        x_c = x_norm - self.b_dec
        sel = self._select(x_c, dead_mask, diagnose)
        recon_k, recon_all, aux_hat = kernels.TopKTrainStep.apply(
            self.W_enc, self.b_enc, self.W_dec, self.b_dec, x_c.detach(), sel["rows"], sel["local_v"], self.k,
            self.multi_topk, sel["dead_rows"], sel["aux_local"], sel["aux_v"], sel["aux_z"],
            torch.bfloat16 if self.auxk_bf16 else None, self.comm.all_reduce_,
        )
        denom = losses.total_variance(x_norm)
        nmse, multi, auxk = kernels.ReconLosses.apply(x_norm, denom, recon_k, recon_all, aux_hat)
        zero = nmse.new_zeros(())
        top_v, top_i = sel["top_v"], sel["top_i"]
        return ForwardOutput(self.denormalize(recon_k, stats), top_v[:, : self.k].relu(), top_i[:, : self.k], nmse,
                             auxk, multi, zero, zero, sel["margin"])

    @torch.no_grad()
    def _select(self, x_c: Tensor, dead_mask: Tensor | None, diagnose: bool) -> dict:
        """TopKSAE._select over the shards: the same choices, as global and local views."""
        k = self.k
        k_sel = min(4 * k if self.multi_topk else k, self.num_latents)
        pre, bias = kernels.encoder_gemm(x_c, self.W_enc, self.b_enc, self.step_buffer)
        ids = self._ids(pre.device)
        top_v, top_i = sharded_topk(pre, k_sel, self.comm, ids, bias=bias)
        dtype = self.W_enc.dtype
        rows, local_v = self._localize(top_v.to(dtype), top_i)
        out = dict(top_v=top_v.to(dtype), top_i=top_i, rows=rows, local_v=local_v, dead_rows=None, aux_local=None,
                   aux_v=None, aux_z=None, margin=None)
        if dead_mask is None or self.k_aux <= 0:
            return out
        fired = torch.zeros(self.num_local, dtype=torch.bool, device=pre.device)
        fired[rows[:, :k][local_v[:, :k] > 0]] = True  # this batch's firings leave the dead set first
        dead_rows = (dead_mask & ~fired).nonzero().squeeze(1)
        n_dead_t = torch.tensor([dead_rows.numel()], dtype=torch.int64, device=pre.device)
        self.comm.all_reduce_([n_dead_t])
        n_dead = int(n_dead_t)
        if n_dead == 0:
            return out
        if diagnose:
            best = torch.full((pre.shape[0],), -math.inf, dtype=torch.float32, device=pre.device)
            if dead_rows.numel():
                cols = pre.index_select(1, dead_rows).float()
                if bias is not None:
                    cols += bias[dead_rows].float()
                best = cols.max(1).values
                del cols
            self.comm.all_reduce_([best], op=dist.ReduceOp.MAX)
            out["margin"] = best - top_v[:, k - 1].float()
        k_aux = min(self.k_aux, n_dead)
        if self.auxk_bf16:
            # As TopKSAE: a bf16 GEMM over the dead rows, whose columns are those rows.
            src = torch.addmm(self.b_enc[dead_rows].bfloat16(), x_c.bfloat16(), self.W_enc[dead_rows].bfloat16().t())
            aux_v, aux_i = sharded_topk(src, k_aux, self.comm, ids[dead_rows], capacity=AUX_CAPACITY)
        else:
            aux_v, aux_i = sharded_topk(pre, k_aux, self.comm, ids, cols=dead_rows, bias=bias, capacity=AUX_CAPACITY)
        del pre
        # Position of each local latent in dead_rows, for the kernel's AuxK inputs.
        where = torch.zeros(self.num_local, dtype=torch.int64, device=dead_rows.device)
        where[dead_rows] = torch.arange(dead_rows.numel(), device=dead_rows.device)
        aux_rows, aux_v = self._localize(aux_v.to(dtype), aux_i)
        aux_local = where[aux_rows]
        out["dead_rows"] = dead_rows
        # A shard's expected share of each token's k_aux against its dead count: dense
        # [B, n_dead_local] GEMMs past 1/8 density (as TopKSAE), and always with no dead here.
        if dead_rows.numel() == 0 or 8 * -(-k_aux // self.comm.size) >= dead_rows.numel():
            z = torch.zeros(aux_v.shape[0], dead_rows.numel(), dtype=dtype, device=aux_v.device)
            if dead_rows.numel():
                z.scatter_add_(1, aux_local, aux_v.relu())
            out["aux_z"] = z
        else:
            out["aux_local"], out["aux_v"] = aux_local, aux_v
        return out

    # ---------------------------------------------------------------- gradient norm
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole SAE: the squared norms of the local
        rows' gradients are summed over the shards; b_dec's gradient (the same on every
        shard) is counted once. Returns the total norm."""
        sharded = [p.grad for p in (self.W_enc, self.b_enc, self.W_dec) if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=self.b_dec.device)
        for g in sharded:
            sq += g.double().pow(2).sum()
        self.comm.all_reduce_([sq])
        if self.b_dec.grad is not None:
            sq += self.b_dec.grad.double().pow(2).sum()
        total = sq.sqrt().squeeze(0)
        coef = (max_norm / (total + eps)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total
