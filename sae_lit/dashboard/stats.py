"""Per-latent statistics from one streaming pass over cached activations.

Memory is fixed by the dictionary size, not by the number of tokens: every quantity is an
accumulator (counts, sums, histogram) or a bounded per-latent selection kept up to date chunk
by chunk (``SegmentedTopK``). The only thing kept per token is its id (4 bytes), so contexts
can be printed at the end.

Activation values are binned on a fixed log2 grid, the same for every latent:
``HIST_PER_OCTAVE`` bins per octave over [2^LOG2_LO, 2^LOG2_HI) (values outside land in the end
bins). The random samples are stratified by octave ("bands": [1, 2), [2, 4), ...), so that a
latent's rare strong activations are sampled as well as its common weak ones; a fixed grid needs
no knowledge of the latent's maximum, which a single pass does not have until the end.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2_LO, LOG2_HI = -10, 12
HIST_PER_OCTAVE = 4
NUM_BANDS = LOG2_HI - LOG2_LO
NUM_BINS = NUM_BANDS * HIST_PER_OCTAVE


def hist_bin(values: Tensor) -> Tensor:
    """Histogram bin of positive values (int64, clamped into [0, NUM_BINS))."""
    b = torch.floor((torch.log2(values.float()) - LOG2_LO) * HIST_PER_OCTAVE)
    return b.clamp_(0, NUM_BINS - 1).long()


def bin_edges() -> Tensor:
    """[NUM_BINS + 1] lower/upper edges of the histogram bins (the end bins also hold everything beyond)."""
    return torch.exp2(torch.arange(NUM_BINS + 1, dtype=torch.float64) / HIST_PER_OCTAVE + LOG2_LO)


class SegmentedTopK:
    """For each of ``groups`` groups, the ``size`` entries with the largest keys seen so far, with
    payload fields. Rows of ``keys`` stay sorted in descending order (-inf marks an empty slot),
    so ``keys[:, -1]`` is the bar a new entry must clear; most of a chunk is rejected by that one
    comparison, and only the groups with survivors are re-sorted. On equal keys the entry seen
    first is kept."""

    def __init__(self, groups: int, size: int, fields: dict[str, tuple[tuple[int, ...], torch.dtype, float]]):
        self.size = size
        self.keys = torch.full((groups, size), -math.inf)
        self.fields = {name: torch.full((groups, size, *shape), fill, dtype=dtype) for name, (shape, dtype, fill) in fields.items()}

    def update(self, group: Tensor, key: Tensor, **new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Offer entries (group [M], key [M], a [M, ...] tensor per field given). Returns where the
        entries that made it now sit, (rows, slots), and their indices into the offered ones, so
        the caller can fill fields it did not give (those computed only for survivors)."""
        S = self.size
        src = (key > self.keys[group, -1]).nonzero().squeeze(1)
        if src.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty
        group, key = group[src], key[src].to(self.keys.dtype)
        touched, inv = torch.unique(group, return_inverse=True)
        U = touched.numel()
        cand_key = torch.cat([self.keys[touched].reshape(-1), key])
        cand_grp = torch.cat([torch.arange(U).repeat_interleave(S), inv])
        # Sort by group, then key descending; old entries first among equal keys.
        order = torch.argsort(cand_key, descending=True, stable=True)
        order = order[torch.argsort(cand_grp[order], stable=True)]
        grp_sorted = cand_grp[order]
        counts = torch.bincount(grp_sorted, minlength=U)
        rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[grp_sorted]
        # Every group offers at least its S old slots, so exactly S win per group, in (group, rank)
        # order: the winners reshape straight into the [U, S] rows.
        order = order[rank < S]
        self.keys[touched] = cand_key[order].view(U, S)
        is_old = order < U * S
        fresh = (~is_old).nonzero().squeeze(1)
        from_new = src[order[fresh] - U * S]
        for name, field in self.fields.items():
            tail = field.shape[2:]
            old = field[touched].reshape(U * S, *tail)
            merged = torch.empty_like(old)
            merged[is_old] = old[order[is_old]]
            if name in new:
                merged[fresh] = new[name][from_new].to(field.dtype)
            field[touched] = merged.view(U, S, *tail)
        return touched[fresh // S], fresh % S, from_new


class LatentStats:
    """Accumulates, per latent: firing count, sum and histogram of its activations, the ``top_n``
    strongest (token, value) with the latent's activations over a window of ``left`` tokens
    before and ``right`` after, and ``samples`` random firings per octave band with windows.

    Tokens are numbered in the order they are seen (block ordinal x T + position). Window entries
    are the latent's value at that position, 0 where it did not fire, NaN where the position was
    not scored (BOS / outlier) or lies outside the block."""

    def __init__(self, num_latents: int, context_length: int, top_n: int = 20, samples: int = 4,
                 left: int = 24, right: int = 8, seed: int = 0):
        n, W = num_latents, left + 1 + right
        self.num_latents, self.T, self.left, self.right = n, context_length, left, right
        self.count = torch.zeros(n, dtype=torch.long)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.hist = torch.zeros(n, NUM_BINS, dtype=torch.long)
        self.tokens_scored = 0
        window = ((W,), torch.float16, math.nan)
        self.top = SegmentedTopK(n, top_n, {"token": ((), torch.long, -1), "window": window})
        self.samples = SegmentedTopK(
            n * NUM_BANDS, samples, {"token": ((), torch.long, -1), "value": ((), torch.float32, 0.0), "window": window}
        )
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def max(self) -> Tensor:
        return self.top.keys[:, 0].clamp_min(0)

    def add(self, row: Tensor, latent: Tensor, value: Tensor, scored: Tensor, first_token: int) -> None:
        """One chunk of whole consecutive blocks. ``row``, ``latent``, ``value`` [M]: the firings
        (value > 0) at chunk row ``row`` (position within the chunk's tokens); ``scored`` [R] bool:
        which of the chunk's R rows were encoded. ``first_token``: the id of the chunk's row 0."""
        n = self.num_latents
        row, latent, value = row.long(), latent.long(), value.float()
        self.tokens_scored += int(scored.sum())
        self.count += torch.bincount(latent, minlength=n)
        self.sum.index_add_(0, latent, value.double())
        b = hist_bin(value)
        self.hist.view(-1).index_add_(0, latent * NUM_BINS + b, torch.ones_like(b))
        token = row + first_token
        lookup = _WindowLookup(row, latent, value, scored, n, self.T, self.left, self.right)

        rows, slots, idx = self.top.update(latent, value, token=token)
        if idx.numel():
            self.top.fields["window"][rows, slots] = lookup(idx)

        key = torch.rand(value.shape, generator=self.generator)
        group = latent * NUM_BANDS + b // HIST_PER_OCTAVE
        rows, slots, idx = self.samples.update(group, key, token=token, value=value)
        if idx.numel():
            self.samples.fields["window"][rows, slots] = lookup(idx)


class _WindowLookup:
    """The chunk's firings sorted by (latent, row): one latent's firings in a window of rows are
    then one contiguous run, found with two binary searches."""

    def __init__(self, row, latent, value, scored, n, T, left, right):
        self.row, self.latent, self.value, self.scored = row, latent, value, scored
        self.R, self.T = scored.numel(), T
        self.offsets = torch.arange(-left, right + 1)
        self.left, self.right = left, right
        self._keys = None

    def __call__(self, idx: Tensor) -> Tensor:
        if self._keys is None:
            self._keys, order = torch.sort(self.latent * self.R + self.row)
            self._values = self.value[order]
        r0, j = self.row[idx], self.latent[idx]
        start = r0 - self.left
        # NaN outside the block and at unscored positions, 0 elsewhere until filled.
        r = r0[:, None] + self.offsets
        block_lo = r0.div(self.T, rounding_mode="floor") * self.T
        inside = (r >= block_lo[:, None]) & (r < block_lo[:, None] + self.T)
        scored = self.scored[r.clamp(0, self.R - 1)]
        w = torch.where(inside & scored, torch.zeros(()), torch.full((), math.nan))
        lo = torch.searchsorted(self._keys, j * self.R + torch.maximum(start, block_lo))
        hi = torch.searchsorted(self._keys, j * self.R + torch.minimum(r0 + self.right + 1, block_lo + self.T))
        counts = hi - lo
        which = torch.repeat_interleave(torch.arange(idx.numel()), counts)
        entry = lo[which] + torch.arange(which.numel()) - (torch.cumsum(counts, 0) - counts)[which]
        col = self._keys[entry] - j[which] * self.R - start[which]
        w[which, col] = self._values[entry]
        return w.half()
