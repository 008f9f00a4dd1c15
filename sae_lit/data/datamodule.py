"""ActivationDataModule: builds the activation cache if needed, then streams it.

Batches are raw float32 activations [batch_size, d_in] (not normalised: the SAE side multiplies
by `norm_scale`). Division between DDP ranks uses the attached trainer's global_rank and
world_size, never environment variables, so it is right under any launcher and testable
with a stand-in trainer.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import zlib
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from sae_lit.common import data_rank
from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache, cache_is_complete
from sae_lit.data.integrity import nonfinite_shards
from sae_lit.data.streams import RowFilter, ShardRef, TrainStream, ValStream
from sae_lit.data.hookpoints import TAP, tl_hook_name
from sae_lit.data.subject import hookpoint_info, hub_name

log = logging.getLogger(__name__)


class ActivationDataModule(L.LightningDataModule):
    def __init__(
        self,
        cache: CacheConfig = CacheConfig(),
        batch_size: int = 4096,
        val_batch_size: int | None = None,
        shuffle_buffer: int = 131_072,
        num_workers: int = 0,
        exclude_bos: bool = True,
        exclude_outliers: bool = True,
        skip_corrupt_shards: bool = False,
        drop_nonfinite: bool = False,
        seed: int = 0,
        progress: bool = True,
    ):
        """
        Args:
            cache: what the activation cache holds and how it is built (sae_lit.data.cache.CacheConfig).
            batch_size: tokens per training batch.
            val_batch_size: tokens per validation batch (default batch_size).
            shuffle_buffer: tokens held by each loader process for token-level shuffling.
            num_workers: DataLoader workers for the training stream.
            exclude_bos: drop each context's BOS position from train/val batches (kept in the cache).
            exclude_outliers: drop tokens with norm > outlier_factor x the median norm (massive
                activations, kept in the cache) from train/val batches and init_sample.
            skip_corrupt_shards: skip (and count) unreadable shards - damaged, truncated, failing
                their checksums - instead of raising.
            drop_nonfinite: leave out tokens whose cached activation holds a NaN or an Inf (a
                warning gives their count). By default a cache with any is refused, naming the
                shards: training on them gives a NaN SAE.
            seed: seeds the training stream's shard order and shuffling.
            progress: show the cache-building progress bar.
        """
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                   ("shuffle_buffer", shuffle_buffer, 0), ("num_workers", num_workers, 0)):
            if value is None and name == "val_batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                want = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"{name} must be {want}, got {value!r}.")
        cfg = CacheConfig(**cache) if isinstance(cache, dict) else cache  # a mapping: sweeps, evaluate
        cache = dataclasses.asdict(cfg)  # saved as plain values (save_hyperparameters reads this frame)
        self.save_hyperparameters()
        self.cache_config = cache = cfg
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.shuffle_buffer, self.num_workers = shuffle_buffer, num_workers
        self.exclude_bos, self.exclude_outliers = exclude_bos, exclude_outliers
        self.skip_corrupt_shards, self.drop_nonfinite, self.seed = skip_corrupt_shards, drop_nonfinite, seed
        self.progress = progress
        self._skipped: set[str] = set()
        self._worker_skips = None  # shared counter, created when worker processes are used

        # d_in is needed before the cache exists (the CLI links it into the SAE's constructor):
        # a finished cache knows it; otherwise the model config does (no weights are loaded).
        self._fingerprint = cache.corpus_obj().fingerprint()
        self.manifest: dict | None = None
        if cache_is_complete(cache, self._fingerprint):
            self.manifest = sh.read_manifest(cache.cache_dir)
            self.d_in: int = int(self.manifest["d_in"])
        else:
            self.d_in = int(hookpoint_info(cache.model, cache.hookpoint)[1])

    # --- Lightning hooks ----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the cache if missing or incomplete. Lightning calls this on one process per node;
        with several processes the build is spread over all of them in ``setup`` instead."""
        if self._processes()[1] == 1 and not cache_is_complete(self.cache_config, self._fingerprint):
            build_cache(self.cache_config, progress=self.progress)

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._processes()
        if world > 1 and not cache_is_complete(self.cache_config, self._fingerprint):
            # Every rank runs the subject model on its shards (on its own device), rank 0 commits.
            strategy = self.trainer.strategy
            root = getattr(strategy, "root_device", None)
            device = root if root is not None and root.type == "cuda" and self.cache_config.device in ("auto", "cuda") else None
            build_cache(self.cache_config, progress=self.progress, rank=rank, world=world, barrier=strategy.barrier,
                        device=device)
        self._load_manifest()

    def _processes(self) -> tuple[int, int]:
        """(global rank, world size) of the attached trainer: who builds which shards."""
        trainer = self.trainer
        return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))

    def _load_manifest(self) -> dict:
        cache_dir = self.cache_config.cache_dir
        manifest = sh.read_manifest(cache_dir)
        if manifest is None or not manifest.get("complete"):
            raise sh.CacheError(
                f"No complete activation cache in {cache_dir}; call prepare_data() (the Trainer does) or "
                f"`python -m sae_lit.data.cache --cache_dir {cache_dir} ...` first."
            )
        sh.check_manifest(manifest, self.cache_config.expected(self._fingerprint), cache_dir)
        if int(manifest["d_in"]) != self.d_in:
            raise sh.CacheError(
                f"{cache_dir}/manifest.json says d_in={manifest['d_in']} but the model config gave {self.d_in} for "
                f"hookpoint {self.cache_config.hookpoint!r}; the SAE would be built with the wrong width."
            )
        self._check_nonfinite(manifest)
        self.manifest = manifest
        return manifest

    def _check_nonfinite(self, manifest: dict) -> None:
        bad = nonfinite_shards(manifest)
        if not bad:
            return
        cache_dir = self.cache_config.cache_dir
        listed = ", ".join(f"{f} ({n})" for f, n in sorted(bad.items())[:5]) + (", ..." if len(bad) > 5 else "")
        total = sum(bad.values())
        if not self.drop_nonfinite:
            raise sh.CacheError(
                f"{total} cached tokens in {cache_dir} have NaN/Inf activations, in {listed}; training on them gives a "
                f"NaN SAE. Set drop_nonfinite=True (data.init_args.drop_nonfinite) to leave them out, or rebuild the "
                f"cache (dtype bfloat16 if float16 overflowed)."
            )
        log.warning("leaving out %d tokens with NaN/Inf activations (drop_nonfinite), in %s", total, listed)

    def ensure_manifest(self) -> dict:
        """The complete cache's manifest (read and checked against this config on first use)."""
        return self.manifest if self.manifest is not None else self._load_manifest()

    def _rank_world(self) -> tuple[int, int]:
        return data_rank(self.trainer)

    def _shards(self, split: str) -> list[ShardRef]:
        root = self.cache_config.cache_dir
        manifest = self.ensure_manifest()
        return [
            ShardRef(
                sh.join(root, s["file"]), s["blocks"], s["first_block"],
                tuple(s["inliers"]) if "inliers" in s else None,
                tuple(sorted((int(i), tuple(pos)) for i, pos in s.get("nonfinite", {}).items())),
                manifest["config_fingerprint"],
            )
            for s in manifest["splits"][split]["shards"]
        ]

    def _row_filter(self) -> RowFilter:
        manifest = self.ensure_manifest()
        threshold = manifest.get("outlier_threshold") if self.exclude_outliers else None
        return RowFilter(manifest["dtype"], self.exclude_bos, threshold, self.drop_nonfinite)

    @property
    def _shape(self) -> tuple[int, int]:
        return (self.cache_config.context_length, self.d_in)

    def _on_skip(self, url: str) -> None:
        self._skipped.add(url)

    def _on_worker_skip(self, url: str) -> None:
        with self._worker_skips.get_lock():
            self._worker_skips.value += 1

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far (skip_corrupt_shards=True), including in loader workers."""
        return len(self._skipped) + (self._worker_skips.value if self._worker_skips is not None else 0)

    def __getstate__(self):
        # A multiprocessing.Value only travels to worker processes by inheritance.
        state = dict(self.__dict__)
        state["_worker_skips"] = None
        return state

    # --- data ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        on_skip = self._on_skip
        if self.num_workers > 0:
            self._worker_skips = self._worker_skips or multiprocessing.Value("i", 0)
            on_skip = self._on_worker_skip
        stream = TrainStream(
            self._shards("train"), self._shape, self.ensure_manifest()["dtype"], self.batch_size, self.shuffle_buffer,
            self._row_filter(), self.seed, rank, world, self.skip_corrupt_shards, on_skip,
            skip_batches=self._batches_done(),
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _batches_done(self) -> int:
        """Training batches this rank already consumed: non-zero when resuming from a checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(getattr(trainer, "global_step", 0)) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def _val_loader(self) -> DataLoader:
        rank, world = self._rank_world()
        stream = ValStream(
            self._shards("val"), self._shape, self.ensure_manifest()["dtype"], self.val_batch_size,
            self._row_filter(), rank, world, self.skip_corrupt_shards, self._on_skip,
        )
        # In-process: the validation set is small, and one reader keeps the batch order fixed.
        return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._val_loader()

    def test_dataloader(self) -> DataLoader:
        return self._val_loader()

    # --- for initialisation, export and evaluation -------------------------------------------

    @property
    def norm_scale(self) -> float | None:
        """s with E||s·x||² = d_in over non-BOS train tokens; None until the cache exists."""
        return None if self.manifest is None else float(self.manifest["norm_scale"])

    def init_sample(self, n: int = 32768) -> torch.Tensor:
        """[n, d_in] float32 train activations (no BOS, no outliers) spread over the whole split,
        the same on every rank: the cache's sample.npy, or for n beyond it a strided pass over
        all train shards."""
        manifest = self.ensure_manifest()
        if n <= manifest["sample"]["tokens"]:
            sample_file = sh.join(self.cache_config.cache_dir, manifest["sample"]["file"])
            data = sh.read_bytes(sample_file)
            if zlib.crc32(data) != manifest["sample"]["crc32"]:
                raise sh.CorruptShardError(sample_file, "it does not match its checksum")
            sample = np.load(io.BytesIO(data), allow_pickle=False)
            return sh.decode_acts(sample[:n], manifest["dtype"])
        # Never a NaN in the init sample (a NaN b_dec poisons everything after).
        rows = RowFilter(manifest["dtype"], True, manifest.get("outlier_threshold"), drop_nonfinite=True)
        available = manifest["splits"]["train"]["blocks"] * (self.cache_config.context_length - 1)
        stride = max(1, available // n)
        parts, have = [], 0
        for shard in self._shards("train"):
            for block in shard.read(self._shape):
                picked = rows(block.acts)[block.index % stride :: stride]
                parts.append(picked)
                have += len(picked)
            if have >= n:
                break
        out = np.concatenate(parts)[:n]
        if len(out) < n:
            log.warning("init_sample: the train split has only %d usable tokens, fewer than the %d asked for.", len(out), n)
        return sh.decode_acts(out, manifest["dtype"])

    def iter_blocks(self, split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All blocks of a split in order as (tokens [T] int64, acts [T, d_in] float32), BOS
        included - for evaluations that need the text (downstream loss, probes, dashboards).
        With drop_nonfinite, a block holding NaN / Inf is left out whole (its text stays intact)."""
        dtype = self.ensure_manifest()["dtype"]
        for shard in self._shards(split):
            bad = {i for i, _ in shard.nonfinite} if self.drop_nonfinite else set()
            for block in shard.read(self._shape, keep=lambda i, bad=bad: i not in bad):
                yield torch.from_numpy(block.tokens.astype(np.int64)), sh.decode_acts(block.acts, dtype)

    def export_metadata(self) -> dict:
        """SAELens cfg.json `metadata`: the hookpoint under its TransformerLens name for the
        standard sites (with model_class_name HookedTransformer), else the module path (for
        SAELens's AutoModelForCausalLM wrapper); hf_hook_name is the module whose output it is,
        left out for a module's input (SAELens hooks outputs only)."""
        if self.manifest is not None:
            module_path = self.manifest["hook_name"]
        else:
            module_path = hookpoint_info(self.cache_config.model, self.cache_config.hookpoint)[0].module_path
        tl_name = tl_hook_name(self.cache_config.hookpoint)
        meta = {
            "model_name": hub_name(self.cache_config.model),
            "model_class_name": "HookedTransformer" if tl_name else "AutoModelForCausalLM",
            "hook_name": tl_name or module_path,
            "hookpoint": self.cache_config.hookpoint,
            "context_size": self.cache_config.context_length,
            "prepend_bos": True,
        }
        if not module_path.endswith("." + TAP):
            meta["hf_hook_name"] = module_path
        return meta
