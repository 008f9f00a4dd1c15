"""A synthetic activation source with known ground truth, for tests and benchmarks.

Activations are sparse non-negative combinations of random unit "feature" directions plus
a shared offset, Gaussian noise and a global scale, so that b_dec init and the input
normalisation matter as they do on real activations. It exposes the same interface as
``ActivationDataModule`` (d_in, init_sample, norm_scale, export_metadata, endless train
stream, fixed per-rank validation split).
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae_lit.common import data_rank


class _SyntheticStream(IterableDataset):
    def __init__(self, dm: "SyntheticActivationDataModule", seed: int, num_batches: int | None, batch_ids=None, start=0):
        self.dm, self.seed, self.num_batches, self.batch_ids, self.start = dm, seed, num_batches, batch_ids, start

    def __iter__(self):
        if self.batch_ids is not None:
            for b in self.batch_ids:
                yield self.dm.make_batch(self.seed * 1_000_003 + b)
            return
        b = self.start
        while self.num_batches is None or b < self.num_batches:
            yield self.dm.make_batch(self.seed * 1_000_003 + b)
            b += 1


class SyntheticActivationDataModule(L.LightningDataModule):
    def __init__(
        self,
        d_in: int = 64,
        num_features: int = 256,
        features_per_token: int = 8,
        batch_size: int = 1024,
        val_batches: int = 4,
        noise: float = 0.01,
        offset: float = 2.0,
        scale: float = 30.0,
        seed: int = 0,
    ):
        super().__init__()
        self.d_in, self.batch_size, self.val_batches = d_in, batch_size, val_batches
        self.features_per_token, self.noise, self.scale, self.seed = features_per_token, noise, scale, seed
        g = torch.Generator().manual_seed(seed)
        f = torch.randn(num_features, d_in, generator=g)
        self.features = f / f.norm(dim=1, keepdim=True)
        self.offset = offset * torch.randn(d_in, generator=g) / d_in**0.5
        # Zipf-like feature frequencies, as in real SAE latents.
        self.freq = 1.0 / torch.arange(1, num_features + 1).float() ** 0.7
        self.norm_scale = None

    def make_batch(self, seed: int, n: int | None = None) -> torch.Tensor:
        n = n or self.batch_size
        g = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(self.freq.expand(n, -1), self.features_per_token, generator=g)
        mags = torch.rand(n, self.features_per_token, generator=g) + 0.5
        x = torch.nn.functional.embedding_bag(idx, self.features, per_sample_weights=mags, mode="sum")
        x = x + self.offset + self.noise * torch.randn(n, self.d_in, generator=g)
        return self.scale * x

    def _rank_world(self) -> tuple[int, int]:
        return data_rank(self.trainer)

    def init_sample(self, n: int = 32768) -> torch.Tensor:
        return self.make_batch(self.seed + 7_777_777, n)

    def export_metadata(self) -> dict:
        return {"model_name": "synthetic", "hook_name": "synthetic", "hookpoint": "synthetic",
                "context_size": 1, "prepend_bos": False}

    def train_dataloader(self):
        rank, _ = self._rank_world()
        # Resume where a restored run left off, so a resumed fit sees the same batches.
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(_SyntheticStream(self, self.seed + 1 + rank, None, start=start), batch_size=None)

    def val_dataloader(self):
        rank, world = self._rank_world()
        # Fixed split, equal per rank: rank r takes batches r, r + world, ...
        per_rank = self.val_batches // world
        ids = list(range(rank, per_rank * world, world))
        return DataLoader(_SyntheticStream(self, 10_000 + self.seed, None, ids), batch_size=None)

    def test_dataloader(self):
        return self.val_dataloader()
