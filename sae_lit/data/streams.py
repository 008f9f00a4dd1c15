"""Iterable datasets over cached shards: the endless, shuffled training stream and the fixed
validation stream. Both yield whole batches (float32 [B, d_in]); use DataLoader(batch_size=None).

How data is divided between processes:
  train  rank r takes shards r, r+W, ... (W = world size); inside a rank, DataLoader worker w
         takes every n-th of those. Each process then draws shards from its own list with
         replacement ("resampled"), so the stream never ends and ranks never read the same shard.
         With fewer shards than processes, processes share shards and take every n-th block.
  val    the val blocks are cut into W contiguous ranges that cover the whole split (sizes differ
         by at most one block), so the ranks together score every validation token exactly
         once: the same totals as one process. Each rank yields the same number of batches -
         unequal counts would hang DDP's collectives - so a rank with fewer rows spreads them
         over smaller batches (the last batch is partial, never dropped).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sae_lit.data.shards import CorruptShardError, decode_acts, finite_rows, iter_shard, row_norms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    url: str
    blocks: int
    first_block: int
    inliers: tuple[int, ...] | None = None  # per block: finite non-BOS tokens under the outlier threshold (val only)
    nonfinite: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (block index, positions holding NaN / Inf)
    config: str | None = None  # the config fingerprint every block must carry

    def read(self, shape=None, keep=None) -> Iterator:
        """Its blocks, checked (count, sequence, shape, checksums, config), without meta.json."""
        return iter_shard(self.url, self.blocks, shape, keep=keep, with_meta=False, first_block=self.first_block,
                          config=self.config)

    def nonfinite_positions(self, index: int) -> tuple[int, ...]:
        return dict(self.nonfinite).get(index, ())


@dataclass(frozen=True)
class Part:
    """A process's share: these shards, and of their blocks those with index % stride == offset."""

    shards: tuple[ShardRef, ...]
    offset: int = 0
    stride: int = 1

    def keep(self, index: int) -> bool:
        return index % self.stride == self.offset

    def split(self, i: int, n: int) -> "Part":
        if n <= 1:
            return self
        if len(self.shards) >= n:
            return Part(self.shards[i::n], self.offset, self.stride)
        return Part(self.shards, self.offset + self.stride * i, self.stride * n)

    def num_blocks(self) -> int:
        return sum(
            sum(1 for b in range(s.first_block, s.first_block + s.blocks) if self.keep(b)) for s in self.shards
        )


@dataclass(frozen=True)
class RowFilter:
    """Which positions of a block become training/validation rows."""

    dtype: str
    exclude_bos: bool = True
    # Norm above which a non-BOS token is an outlier (see cache._finalize); None keeps all.
    threshold: float | None = None
    # Leave out rows holding a NaN or an Inf. The data module refuses a cache that has any
    # unless asked to drop them; with a threshold they fail the norm test anyway.
    drop_nonfinite: bool = False

    def __call__(self, acts: np.ndarray) -> np.ndarray:
        return acts[self.mask(acts)]

    def mask(self, acts: np.ndarray) -> np.ndarray:
        """Bool [T]: the positions of a block that become rows (what dashboards need to map rows
        back to tokens)."""
        # Position 0 of every block is BOS (see corpus.pack_contexts): an attention sink with a
        # huge norm that would dominate the loss. It is judged by exclude_bos alone.
        keep = np.ones(len(acts), dtype=bool)
        keep[0] = not self.exclude_bos
        if self.threshold is not None:
            keep[1:] = (row_norms(acts[1:], self.dtype) <= self.threshold) & finite_rows(acts[1:], self.dtype)
        if self.drop_nonfinite:
            keep &= finite_rows(acts, self.dtype)
        return keep

    def count(self, length: int, inliers: int | None, nonfinite: tuple[int, ...] = ()) -> int:
        """Rows of a block of `length` tokens, from the manifest's counts: `inliers` (finite
        non-BOS tokens under the threshold) and the positions holding NaN / Inf."""
        dropped = set(nonfinite) if self.drop_nonfinite or self.threshold is not None else set()
        if self.threshold is not None:
            if inliers is None:
                raise ValueError("counting rows under an outlier threshold needs the manifest's per-block inlier counts")
            body = inliers
        else:
            body = length - 1 - len(dropped - {0})
        bos = 0 if self.exclude_bos or (self.drop_nonfinite and 0 in nonfinite) else 1
        return body + bos


class TrainStream(IterableDataset):
    def __init__(
        self,
        shards: list[ShardRef],
        shape: tuple[int, int],
        dtype: str,
        batch_size: int,
        shuffle_buffer: int,
        rows: RowFilter,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        skip_corrupt: bool = False,
        on_skip: Callable[[str], None] | None = None,
        skip_batches: int = 0,
    ):
        self.part = Part(tuple(shards)).split(rank, world_size)
        # A resumed run fast-forwards past the batches it already trained on (reading without
        # decoding), so that it sees exactly what an uninterrupted run would have.
        self.skip_batches = skip_batches
        if len(shards) < world_size:
            log.warning(
                "%d train shards for %d ranks: ranks share shards (every %d-th block each). Lower "
                "tokens_per_shard when building the cache to split by shard.", len(shards), world_size, world_size,
            )
        if self.part.num_blocks() == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no training blocks out of {len(shards)} shards; build a larger cache.")
        self.shape, self.dtype, self.batch_size = tuple(shape), dtype, batch_size
        self.capacity = max(shuffle_buffer, 2 * batch_size)
        self.rows, self.seed, self.rank = rows, seed, rank
        self.skip_corrupt, self.on_skip = skip_corrupt, on_skip

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part = self.part.split(worker, n_workers)
        if part.num_blocks() == 0:
            # More workers than blocks on this rank: this worker idles and the others carry on.
            return
        shards = list(part.shards)
        rng = np.random.default_rng([self.seed, self.rank, worker])
        # The DataLoader takes batches from its workers in turn: batch i comes from worker i % n.
        to_skip = len(range(worker, self.skip_batches, n_workers))
        buffer, size = [], 0
        while True:
            shard = shards[rng.integers(len(shards))]
            try:
                for block in shard.read(self.shape, keep=part.keep):
                    rows = self.rows(block.acts)
                    buffer.append(rows)
                    size += len(rows)
                    if size >= self.capacity:
                        # Shuffle the whole buffer at token level, emit about half, keep the rest
                        # to mix with the next blocks (a tokens' neighbours in text are correlated).
                        pool = np.concatenate(buffer)[rng.permutation(size)]
                        n_out = (size - self.capacity // 2) // self.batch_size
                        for b in range(n_out):
                            if to_skip:
                                to_skip -= 1
                                continue
                            yield decode_acts(pool[b * self.batch_size : (b + 1) * self.batch_size], self.dtype)
                        buffer = [pool[n_out * self.batch_size :]]
                        size = len(buffer[0])
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise
                shards.remove(shard)
                log.warning("skipping corrupt shard %s (%s)", shard.url, e)
                if self.on_skip is not None:
                    self.on_skip(shard.url)
                if not shards:
                    raise CorruptShardError(shard.url, "every training shard of this process was skipped as corrupt") from e


def batch_sizes(rows: int, n: int, batch_size: int) -> list[int]:
    """`n` batch sizes of at most `batch_size` adding up to `rows` (n * batch_size >= rows):
    full batches first, then smaller ones, each holding at least one row while rows last."""
    sizes = []
    for i in range(n):
        size = max(0, min(batch_size, rows - (n - i - 1)))
        sizes.append(size)
        rows -= size
    return sizes


class ValStream(IterableDataset):
    """The whole validation split, every row once over all ranks; `len()` is the same on every
    rank. Rank r scores blocks [r * N // W, (r + 1) * N // W) of the N val blocks."""

    def __init__(
        self,
        shards: list[ShardRef],
        shape: tuple[int, int],
        dtype: str,
        batch_size: int,
        rows: RowFilter,
        rank: int = 0,
        world_size: int = 1,
        skip_corrupt: bool = False,
        on_skip: Callable[[str], None] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive integer, got {batch_size!r}.")
        total = sum(s.blocks for s in shards)
        bounds = [r * total // world_size for r in range(world_size + 1)]
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        counts = [
            rows.count(shape[0], n, s.nonfinite_positions(s.first_block + i))
            for s in shards for i, n in enumerate(s.inliers or [None] * s.blocks)
        ]
        per_rank = [sum(counts[bounds[r] : bounds[r + 1]]) for r in range(world_size)]
        self.rows_expected = per_rank[rank]
        self.num_batches = max(-(-n // batch_size) for n in per_rank)
        if self.num_batches == 0:
            raise ValueError(
                f"validation: the {total} val blocks hold no rows to score (every token filtered out); raise "
                f"val_tokens or check exclude_bos / exclude_outliers."
            )
        if self.rows_expected < self.num_batches:
            log.warning(
                "validation: rank %d of %d gets %d rows for %d batches (the val split has %d blocks); some of "
                "its batches are empty. Raise val_tokens or use fewer ranks.",
                rank, world_size, self.rows_expected, self.num_batches, total,
            )
        self.sizes = batch_sizes(self.rows_expected, self.num_batches, batch_size)
        self.shards, self.total = list(shards), total
        self.shape, self.dtype, self.batch_size = tuple(shape), dtype, batch_size
        self.rows, self.skip_corrupt, self.on_skip = rows, skip_corrupt, on_skip

    def __len__(self) -> int:
        return self.num_batches

    def _blocks(self) -> Iterator[np.ndarray]:
        # This rank's range only. A corrupt shard skipped (skip_corrupt) loses its rows, counted
        # by on_skip; the batch count stays the same (padded with empty batches).
        for shard in self.shards:
            if shard.first_block + shard.blocks <= self.lo or shard.first_block >= self.hi:
                continue
            try:
                for block in shard.read(self.shape, keep=lambda i: self.lo <= i < self.hi):
                    yield self.rows(block.acts)
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise
                log.warning("skipping corrupt validation shard %s (%s)", shard.url, e)
                if self.on_skip is not None:
                    self.on_skip(shard.url)

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks = self._blocks()
        pending, have, emitted = [], 0, 0
        for size in self.sizes:
            while have < size:
                rows = next(blocks, None)
                if rows is None:
                    break  # rows lost to a skipped shard
                pending.append(rows)
                have += len(rows)
            if have == 0:
                break
            pool = np.concatenate(pending)
            take = min(size, have)
            yield decode_acts(pool[:take], self.dtype)
            emitted += 1
            pending, have = [pool[take:]], have - take
        # Read to the end, so that a shard cut short after the last row this rank needs is
        # still noticed (iter_shard checks the block count when a shard ends).
        have += sum(len(rows) for rows in blocks)
        if have:
            raise CorruptShardError(self.shards[-1].url, f"validation found {have} rows more than the manifest counts")
        for _ in range(self.num_batches - emitted):
            yield torch.empty((0, self.shape[1]), dtype=torch.float32)
