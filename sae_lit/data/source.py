"""What the rest of sae_lit needs from a data module, as named contracts.

``ActivationSource``: what training needs (SAEModule's data-dependent init and export
metadata). ``CachedActivations``: what the LM evaluations need on top (token blocks with their
activations, the cache's manifest and config). ActivationDataModule is both; the synthetic
data module is an ActivationSource only. Checked with isinstance (runtime_checkable), never
by probing for attributes one at a time.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int
    """Activation width."""

    @property
    def norm_scale(self) -> float | None:
        """The dataset normalisation constant s (E||s x||^2 = d_in), or None to estimate it
        from the init sample."""

    def init_sample(self, n: int) -> Tensor:
        """[n, d_in] float32 raw training activations, the same on every rank (for the
        normalisation constant and the geometric-median b_pre)."""

    def export_metadata(self) -> dict:
        """SAELens cfg.json `metadata` (model_name, hook_name, context_size, ...)."""


@runtime_checkable
class CachedActivations(ActivationSource, Protocol):
    cache_config: object
    """The CacheConfig the cache was built from (model, hookpoint, context_length, cache_dir)."""
    exclude_outliers: bool
    """Whether training leaves out tokens above the manifest's outlier threshold."""

    def ensure_manifest(self) -> dict:
        """The complete cache's manifest.json (read and checked on first use)."""

    def iter_blocks(self, split: str = "val") -> Iterator[tuple[Tensor, Tensor]]:
        """All blocks of a split in order as (tokens [T] int64, acts [T, d_in] float32)."""
