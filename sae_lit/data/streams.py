"""Iterable datasets over cached shards: the endless, shuffled training stream and the fixed
validation stream. Both yield whole batches (float32 [B, d_in]); use DataLoader(batch_size=None).

How data is divided between processes:
  train  rank r takes shards r, r+W, ... (W = world size); inside a rank, DataLoader worker w
         takes every n-th of those. Each process then draws shards from its own list with
         replacement ("resampled"), so the stream never ends and ranks never read the same shard.
         With fewer shards than processes, processes share shards and take every n-th block.
  val    the val blocks are cut into W equal contiguous ranges (remainder dropped) and each rank
         yields the same number of batches - unequal counts would hang DDP's collectives.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sae_lit.data.shards import CorruptShardError, decode_acts, iter_shard, row_norms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    url: str
    blocks: int
    first_block: int
    inliers: tuple[int, ...] | None = None  # per block: non-BOS tokens under the outlier threshold (val only)


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
            keep[1:] = row_norms(acts[1:], self.dtype) <= self.threshold
        return keep

    def count(self, shape: tuple[int, int], inliers: int | None) -> int:
        body = shape[0] - 1 if self.threshold is None or inliers is None else inliers
        return body + (0 if self.exclude_bos else 1)


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
                for block in iter_shard(shard.url, shard.blocks, self.shape, keep=part.keep, with_meta=False):
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


class ValStream(IterableDataset):
    """A fixed list of batches; `len()` is the same on every rank."""

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
        total = sum(s.blocks for s in shards)
        per_rank = total // world_size
        self.lo, self.hi = rank * per_rank, (rank + 1) * per_rank
        counts = [rows.count(shape, n) for s in shards for n in (s.inliers or [None] * s.blocks)]
        # Dropped outliers make ranges differ slightly; every rank yields the smallest count.
        self.num_batches = min(sum(counts[r * per_rank : (r + 1) * per_rank]) for r in range(world_size)) // batch_size
        if self.num_batches == 0:
            raise ValueError(
                f"validation: {total} val blocks of {shape[0]} tokens over {world_size} rank(s) do not fill one "
                f"batch of {batch_size}; lower val_batch_size or raise val_tokens."
            )
        self.shards, self.total = list(shards), total
        self.shape, self.dtype, self.batch_size = tuple(shape), dtype, batch_size
        self.rows, self.skip_corrupt, self.on_skip = rows, skip_corrupt, on_skip

    def __len__(self) -> int:
        return self.num_batches

    def _blocks(self) -> Iterator[np.ndarray]:
        # Own range first. If corrupt shards were skipped, carry on through the whole split (and
        # round again) so this rank still yields num_batches: overlapping another rank's data
        # beats a DDP deadlock in the validation loop.
        order = [s for s in self.shards if s.first_block + s.blocks > self.lo and s.first_block < self.hi]
        bad: set[str] = set()
        passes = itertools.chain([(order, lambda i: self.lo <= i < self.hi)], itertools.repeat((self.shards, None)))
        for shards, keep in passes:
            produced = False
            for shard in shards:
                if shard.url in bad:
                    continue
                try:
                    for block in iter_shard(shard.url, shard.blocks, self.shape, keep=keep, with_meta=False):
                        produced = True
                        yield self.rows(block.acts)
                except CorruptShardError:
                    if not self.skip_corrupt:
                        raise
                    bad.add(shard.url)
                    log.warning("skipping corrupt validation shard %s", shard.url)
                    if self.on_skip is not None:
                        self.on_skip(shard.url)
            if keep is None and not produced:
                raise CorruptShardError(self.shards[0].url, "every validation shard was skipped as corrupt")

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending, size, emitted = [], 0, 0
        for rows in self._blocks():
            pending.append(rows)
            size += len(rows)
            if size >= self.batch_size:
                pool = np.concatenate(pending)
                n = min(len(pool) // self.batch_size, self.num_batches - emitted)
                for b in range(n):
                    yield decode_acts(pool[b * self.batch_size : (b + 1) * self.batch_size], self.dtype)
                emitted += n
                if emitted == self.num_batches:
                    return
                pending, size = [pool[n * self.batch_size :]], len(pool) - n * self.batch_size
