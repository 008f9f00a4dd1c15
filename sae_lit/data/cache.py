"""Build the activation cache: text -> subject LM (stopped at the hookpoint) -> shards + manifest.

    python -m sae_lit.data.cache --config configs/quickstart.yaml      # uses its data: section
    python -m sae_lit.data.cache --model gpt2 --hookpoint resid_post.8 --cache_dir data/cache/gpt2-l8
    python -m sae_lit.data.cache --cache_dir data/cache/quickstart --verify   # re-read and check every shard

The build is deterministic (document order, packing, block numbering depend only on the
config), so an interrupted build resumes at shard granularity: shards already on disk are
checked (their blocks must carry this config's fingerprint and checksums) and skipped (their
text is re-tokenised, which is cheap, but not re-run through the model), and the result is
identical to an uninterrupted build. One build at a time per folder (a lock file); a second
one waits, then finds the cache complete.

Spread over ranks (``torchrun --nproc-per-node N -m sae_lit.data.cache ...``, or the data
module under a multi-process Trainer): every rank packs the whole text (cheap) and runs the
subject model on the shards it owns, shard i of the build going to rank i mod N; rank 0 then
reads the statistics back and commits the one manifest. The shards and the manifest are
those of a one-rank build, and an interrupted build resumes the same way. cache_dir must be
storage every rank sees.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sae_lit.common import atomic_path, bf16_speedup, remove_stale_temps, run_cli
from sae_lit.data import shards as sh
from sae_lit.data.integrity import build_lock, existing_shard, nonfinite_shards, verify_cache
from sae_lit.data.corpus import make_corpus, pack_contexts, special_ids
from sae_lit.data.subject import (
    HookedForward, canonical_model, hookpoint_info, hub_name, load_model, load_tokenizer, resolve_device,
    runs_packed_gguf,
)

log = logging.getLogger(__name__)

SUBJECT_DTYPES = ("auto", "float32", "bfloat16")


def resolve_subject_dtype(requested: str, device: torch.device, d_model: int, model: str | None = None) -> str:
    """The subject model's dtype for ``requested`` ("auto" decided by measurement on CPUs)."""
    if requested != "auto":
        return requested
    if model is not None and runs_packed_gguf(model):
        return "float32"  # packed GGUF kernels compute in float32 whatever the dtype
    if device.type != "cpu":
        return "bfloat16"
    return "bfloat16" if bf16_speedup(512, d_model, 4 * d_model) >= 1.5 else "float32"


@dataclass
class CacheConfig:
    """What the activation cache holds and how it is built. The manifest pins the keys that
    change the activations (shards.MATCH_KEYS), so a cache is never reused for another config."""

    cache_dir: str = "data/cache/quickstart"
    """Where manifest.json and the shards live (built on first use)."""
    model: str = "smollm2-135m"
    """Subject model: "smollm2-135m" (embedded GGUF), a hub id, a local folder or a .gguf file."""
    hookpoint: str = "resid_post.15"
    """"resid_post.L" (output of block L) or a module path such as "model.layers.5.mlp"."""
    corpus: str | list[str] = "embedded"
    """"embedded", local .txt/.jsonl/.parquet file(s) or folder(s), or "hf:<dataset>[:<config>][@split]"."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    train_tokens: int = 2_000_000
    """Tokens to cache for training (BOS positions included)."""
    val_tokens: int = 100_000
    """Tokens to cache for validation (held-out documents)."""
    dtype: str = "float16"
    """Storage dtype of the activations: "float16" or "bfloat16"."""
    tokens_per_shard: int = 32_768
    """Shard size; several shards per rank and worker let DDP split by shard."""
    model_batch_size: int = 16
    """Contexts per subject-model forward."""
    device: str = "auto"
    """Where the subject model runs: "auto", "cpu", "cuda", ..."""
    subject_dtype: str = "auto"
    """Precision of the subject model's forward: "float32", "bfloat16", or "auto": bfloat16 on
    GPUs and on CPUs where a bf16 GEMM at the model's shapes is measured at least 1.5x faster
    than fp32 (AMX, AVX512-BF16), float32 elsewhere. The manifest records the dtype used; an
    explicit dtype refuses a cache built with the other."""
    seed: int = 0
    """Seeds the document split and the document order."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    text_field: str = "text"
    """Field holding the text in .jsonl / .parquet / hf: corpora."""
    sample_tokens: int = 32_768
    """Tokens (BOS excluded) kept in sample.npy for the normalisation constant and b_pre init."""
    outlier_factor: float | None = 10.0
    """Tokens whose activation norm exceeds this multiple of the median norm are outliers, left
    out of training, validation and the statistics (kept in the shards); None keeps all."""

    def __post_init__(self):
        positive = ("context_length", "train_tokens", "val_tokens", "tokens_per_shard", "model_batch_size", "sample_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cache.{name} must be a positive integer, got {value!r}.")
        if self.context_length < 2:
            raise ValueError(f"cache.context_length must be at least 2 (BOS + one token), got {self.context_length}.")
        for name in ("train_tokens", "val_tokens"):
            if getattr(self, name) < self.context_length:
                raise ValueError(
                    f"cache.{name} must be at least context_length ({self.context_length}), got {getattr(self, name)}."
                )
        if self.dtype not in sh.DTYPES:
            raise ValueError(f"cache.dtype must be one of {sh.DTYPES}, got {self.dtype!r}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"cache.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction!r}.")
        if self.outlier_factor is not None and not self.outlier_factor > 0:
            raise ValueError(f"cache.outlier_factor must be positive or null (keep all tokens), got {self.outlier_factor!r}.")

    @property
    def blocks_per_shard(self) -> int:
        return max(1, self.tokens_per_shard // self.context_length)

    def corpus_obj(self):
        return make_corpus(self.corpus, self.val_fraction, self.seed, self.text_field)

    def expected(self, fingerprint: str | None = None) -> dict:
        """The manifest keys this config pins (shards.MATCH_KEYS)."""
        if self.dtype not in sh.DTYPES:
            raise ValueError(f"dtype must be one of {sh.DTYPES}, got {self.dtype!r}.")
        if self.subject_dtype not in SUBJECT_DTYPES:
            raise ValueError(f"subject_dtype must be one of {SUBJECT_DTYPES}, got {self.subject_dtype!r}.")
        return {
            **({} if self.subject_dtype == "auto" else {"subject_dtype": self.subject_dtype}),
            "format_version": sh.FORMAT_VERSION,
            "model": canonical_model(self.model),
            "hookpoint": self.hookpoint,
            "dtype": self.dtype,
            "context_length": self.context_length,
            "source_fingerprint": fingerprint if fingerprint is not None else self.corpus_obj().fingerprint(),
            "train_tokens_requested": self.train_tokens,
            "val_tokens_requested": self.val_tokens,
            "blocks_per_shard": self.blocks_per_shard,
            "outlier_factor": self.outlier_factor,
        }


@dataclass
class BuildResult:
    manifest: dict
    seconds: float  # wall time of the tokenise -> forward -> write loop (model loading excluded)
    tokens_computed: int  # tokens run through the model (0 if everything was already cached)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_computed / self.seconds if self.seconds > 0 else float("nan")


def missing_shards(cache_dir, manifest: dict) -> list[str]:
    if sh.is_url(cache_dir):
        return []  # not probed: a missing remote shard is named when it is read
    return [
        s["file"]
        for split in manifest.get("splits", {}).values()
        for s in split["shards"]
        if not (Path(cache_dir) / s["file"]).exists()
    ]


def cache_is_complete(cfg: CacheConfig, fingerprint: str | None = None) -> bool:
    """True if cache_dir holds a finished cache for this config; raises if it holds another's."""
    manifest = sh.read_manifest(cfg.cache_dir)
    if manifest is None:
        return False
    sh.check_manifest(manifest, cfg.expected(fingerprint), cfg.cache_dir)
    return bool(manifest.get("complete")) and not missing_shards(cfg.cache_dir, manifest)


def build_cache(
    cfg: CacheConfig,
    progress: bool = True,
    subject: tuple | None = None,
    on_shard: Callable[[str], None] | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    device: str | torch.device | None = None,
) -> BuildResult:
    """Build (or finish) the cache for `cfg`. `subject` = (model, tokenizer) already loaded, for
    benchmarks; `on_shard(path)` is called after each shard lands (tests interrupt from it).

    Spread over `world` ranks: every rank calls this with its `rank` and a `barrier` over all
    of them (e.g. torch.distributed.barrier); `device` (default cfg.device) is where this
    rank runs the subject model."""
    if world > 1 and barrier is None:
        raise ValueError(f"build_cache over {world} ranks needs a barrier callable over all of them")
    if sh.is_url(cfg.cache_dir):
        raise sh.CacheError(f"cache_dir {cfg.cache_dir!r} is remote and holds no complete cache for this config: "
                            "build the cache into a local folder, upload it, and point cache_dir at it")
    cache_dir = Path(cfg.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = cfg.corpus_obj()
    expected = cfg.expected(corpus.fingerprint())
    # One build at a time per folder: rank 0 holds the lock for its whole build (the other
    # ranks of the same build follow it through the barriers).
    with build_lock(cache_dir) if rank == 0 else contextlib.nullcontext():
        # Under the lock: whatever the manifest says now is final (another builder may just
        # have finished), and every temporary file is a leftover of a killed build.
        manifest = sh.read_manifest(cache_dir)
        if manifest is not None:
            sh.check_manifest(manifest, expected, cache_dir)
            if manifest.get("complete") and not missing_shards(cache_dir, manifest):
                return BuildResult(manifest, 0.0, 0)
        if rank == 0:
            stale = remove_stale_temps(cache_dir)
            if stale:
                log.info("removed %d temporary file(s) left by an interrupted build in %s", len(stale), cache_dir)
        try:
            return _build(cfg, corpus, expected, manifest, progress, subject, on_shard, rank, world, barrier, device)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise sh.CacheError(
                f"No space left on the device holding {cache_dir} ({e}). Nothing incomplete was kept: free some "
                f"space (or set cache_dir elsewhere) and run the build again; it resumes at the first missing shard."
            ) from e


def _build(cfg, corpus, expected, manifest, progress, subject, on_shard, rank, world, barrier, device) -> BuildResult:
    cache_dir = Path(cfg.cache_dir)
    device = resolve_device(cfg.device if device is None else str(device))
    if subject is not None:
        dtype = str(next(subject[0].parameters()).dtype).removeprefix("torch.")
    elif manifest is not None and manifest.get("subject_dtype"):
        dtype = manifest["subject_dtype"]  # a resumed build goes on as it started (auto included)
    else:
        dtype = resolve_subject_dtype(cfg.subject_dtype, device, hookpoint_info(cfg.model, cfg.hookpoint)[1], cfg.model)
    if rank == 0:
        # Recorded before any shard, so a resumed build is checked against the config it started with.
        sh.write_manifest(cache_dir, {**expected, "subject_dtype": dtype, "complete": False})
    if barrier is not None:
        barrier()
        dtype = sh.read_manifest(cache_dir)["subject_dtype"]  # "auto" measured once, by rank 0
    expected = {**expected, "subject_dtype": dtype}

    if subject is None:
        subject = (load_model(cfg.model, device, dtype), load_tokenizer(cfg.model))
    model, tokenizer = subject
    forward = HookedForward(model, cfg.hookpoint)
    device = next(model.parameters()).device

    targets = {"train": cfg.train_tokens // cfg.context_length, "val": cfg.val_tokens // cfg.context_length}
    if min(targets.values()) < 1:
        raise ValueError(f"train_tokens and val_tokens must each be at least context_length ({cfg.context_length}).")
    fingerprint = sh.config_fingerprint(expected)
    bar = _progress_bar(sum(targets.values()) * cfg.context_length // world, progress and rank == 0)
    start, computed, splits, first_shard = time.perf_counter(), 0, {}, 0
    try:
        for split in ("train", "val"):
            # Shard i of the whole build (train first) is rank i mod world's.
            owns = lambda i, base=first_shard: (base + i) % world == rank  # noqa: E731
            splits[split], n = _write_split(cfg, split, targets[split], corpus, tokenizer, forward, device, bar,
                                            on_shard, fingerprint, owns)
            computed += n
            first_shard += len(splits[split]["shards"])
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    if barrier is not None:
        barrier()  # every rank's shards are on disk
    if rank == 0:
        if world > 1:
            _read_other_ranks_shards(cfg, splits, fingerprint)
        manifest = sh.write_manifest(cache_dir, _finalize(cfg, expected, splits, tokenizer, forward, fingerprint))
    if barrier is not None:
        barrier()
        manifest = sh.read_manifest(cache_dir)
    log.info("activation cache complete: %s (%.0f tokens/s%s)", cache_dir, computed / max(seconds, 1e-9),
             f" on rank {rank} of {world}" if world > 1 else "")
    bad = manifest["nonfinite_tokens"]
    if rank == 0 and any(bad.values()):
        log.warning(
            "%s: %d train and %d val tokens have NaN/Inf activations (%s); training refuses this cache unless the "
            "data module drops them (drop_nonfinite=True).", cache_dir, bad["train"], bad["val"],
            ", ".join(sorted(nonfinite_shards(manifest))),
        )
    return BuildResult(manifest, seconds, computed)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="caching activations", disable=not enabled, smoothing=0.1)


def _write_split(cfg, split, n_blocks, corpus, tokenizer, forward, device, bar, on_shard, fingerprint,
                 owns=None) -> tuple[dict, int]:
    T, bps = cfg.context_length, cfg.blocks_per_shard
    contexts = itertools.islice(pack_contexts(corpus.documents(split), tokenizer, T), n_blocks)
    shards, computed, first = [], 0, 0
    for index in itertools.count():
        batch = list(itertools.islice(contexts, bps))
        if not batch:
            break
        path = Path(cfg.cache_dir) / sh.shard_name(split, index)
        if owns is not None and not owns(index):
            nonfinite = None  # another rank's: read back by rank 0 once every rank is done
        else:
            nonfinite = existing_shard(path, split, first, len(batch), cfg.context_length, cfg.dtype, fingerprint,
                                       cfg.cache_dir) if path.exists() else None
            if nonfinite is None:
                nonfinite = _write_shard(path, split, first, batch, forward, device, cfg, bar, fingerprint)
                computed += len(batch) * T
                if on_shard is not None:
                    on_shard(str(path))
            else:
                bar.update(len(batch) * T)
        entry = {"file": path.name, "blocks": len(batch), "first_block": first}
        if nonfinite:
            entry["nonfinite"] = nonfinite
        shards.append(entry)
        first += len(batch)
    if first < n_blocks:
        log.warning(
            "corpus %s ran out: the %s split has %d tokens, %d were asked for.",
            cfg.corpus, split, first * T, n_blocks * T,
        )
    if first == 0:
        raise ValueError(f"The {split} split of corpus {cfg.corpus!r} is empty; add text or raise val_fraction ({cfg.val_fraction}).")
    n_bad = sum(len(v) for s in shards for v in s.get("nonfinite", {}).values())
    return {"tokens": first * T, "blocks": first, "nonfinite_tokens": n_bad, "shards": shards}, computed


def _read_other_ranks_shards(cfg, splits: dict, fingerprint: str) -> None:
    """Rank 0 of a spread build: check the shards the other ranks wrote (config fingerprint,
    checksums) and record their non-finite rows, as for its own."""
    for split, info in splits.items():
        for entry in info["shards"]:
            if "nonfinite" in entry:
                continue
            path = Path(cfg.cache_dir) / entry["file"]
            nonfinite = existing_shard(path, split, entry["first_block"], entry["blocks"], cfg.context_length,
                                       cfg.dtype, fingerprint, cfg.cache_dir)
            if nonfinite is None:
                raise sh.CorruptShardError(path, "written by another rank of this build, but unreadable")
            if nonfinite:
                entry["nonfinite"] = nonfinite
        info["nonfinite_tokens"] = sum(len(v) for s in info["shards"] for v in s.get("nonfinite", {}).values())


def _write_shard(path, split, first, batch, forward, device, cfg, bar, fingerprint) -> dict:
    """Run one shard's contexts through the model and write it; returns its non-finite rows
    {block index: [positions]} (NaN from the model, or values beyond float16's range)."""
    tokens = np.stack([c.tokens for c in batch])
    writer = sh.ShardWriter(path, fingerprint)
    nonfinite = {}
    try:
        for lo in range(0, len(batch), cfg.model_batch_size):
            ids = torch.from_numpy(tokens[lo : lo + cfg.model_batch_size]).long().to(device)
            with torch.inference_mode():
                acts = sh.encode_acts(forward(ids), cfg.dtype)
            for j, row in enumerate(acts):
                ctx = batch[lo + j]
                head = ctx.docs[0]
                meta = {"doc_id": head["id"], "source": head["source"], "offset": head["offset"], "docs": ctx.docs}
                writer.add(sh.block_key(split, first + lo + j), row, ctx.tokens, meta)
                bad = sh.nonfinite_positions(row, cfg.dtype)
                if bad:
                    nonfinite[str(first + lo + j)] = bad
            bar.update(len(acts) * cfg.context_length)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return nonfinite


def _finalize(cfg, expected, splits, tokenizer, forward, fingerprint) -> dict:
    """Statistics, read back from disk so a resumed build gets the same.

    A sample of non-BOS train tokens spread over the whole split (not the first shard: one shard
    is only a few dozen documents) gives the median norm, the outlier threshold and the
    normalisation constant. Outliers are the "massive activations" some models put on a token
    near the start of a context (SmolLM2: ~3% of contexts, position 1, norm ~100x the median);
    left in, a handful of them outweighs the whole rest of a batch in the MSE. Non-finite rows
    are never part of the statistics."""
    cache_dir = Path(cfg.cache_dir)
    train = splits["train"]
    rng = np.random.default_rng(cfg.seed)
    T, n_blocks = cfg.context_length, train["blocks"]
    per_block = min(T - 1, max(16, math.ceil(cfg.sample_tokens / n_blocks)))
    # 2% spare so that dropping outliers still leaves sample_tokens.
    n_chosen = min(n_blocks, math.ceil(1.02 * cfg.sample_tokens / per_block))
    chosen = np.sort(rng.choice(n_blocks, size=n_chosen, replace=False))
    rows = []
    for shard in train["shards"]:
        lo, hi = shard["first_block"], shard["first_block"] + shard["blocks"]
        wanted = set(chosen[(chosen >= lo) & (chosen < hi)].tolist())
        if not wanted:
            continue
        url = str(cache_dir / shard["file"])
        for block in sh.iter_shard(url, shard["blocks"], keep=wanted.__contains__, with_meta=False,
                                   first_block=lo, config=fingerprint):
            positions = 1 + rng.choice(T - 1, size=per_block, replace=False)
            rows.append(block.acts[np.sort(positions)])
    sample = np.concatenate(rows)
    sample = sample[rng.permutation(len(sample))]  # any prefix is then an unbiased subsample
    sample = sample[sh.finite_rows(sample, cfg.dtype)]
    if len(sample) == 0:
        raise sh.CacheError(f"{cache_dir}: every sampled train activation is NaN or Inf; the subject model or its dtype is broken.")
    norms = sh.row_norms(sample, cfg.dtype)
    median_norm = float(np.median(norms))
    threshold = cfg.outlier_factor * median_norm if cfg.outlier_factor else math.inf
    inliers = norms <= threshold
    sample = sample[inliers][: cfg.sample_tokens]
    x = sh.decode_acts(sample, cfg.dtype).double()
    mean_sq_norm = float((x * x).sum(-1).mean())
    d_in = int(sample.shape[-1])
    _save_npy_atomic(cache_dir / "sample.npy", sample)

    # Validation batch counts must be known exactly before reading (equal on every rank), so
    # record how many non-BOS tokens of each val block are finite inliers.
    for shard in splits["val"]["shards"]:
        url = str(cache_dir / shard["file"])
        blocks = sh.iter_shard(url, shard["blocks"], with_meta=False, first_block=shard["first_block"], config=fingerprint)
        shard["inliers"] = [int(((sh.row_norms(b.acts[1:], cfg.dtype) <= threshold) & sh.finite_rows(b.acts[1:], cfg.dtype)).sum())
                            for b in blocks]

    bos, sep = special_ids(tokenizer)
    return {
        **expected,
        "config_fingerprint": fingerprint,
        "corpus": cfg.corpus if isinstance(cfg.corpus, str) else list(cfg.corpus),
        "model_name": hub_name(cfg.model),
        "hook_name": forward.hookpoint.module_path,
        "d_in": d_in,
        "bos_token_id": int(bos),
        "separator_token_id": int(sep),
        "train_tokens": train["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "num_shards": {s: len(v["shards"]) for s, v in splits.items()},
        # Tokens whose activation holds a NaN or an Inf (per shard: {block: positions}).
        "nonfinite_tokens": {s: v["nonfinite_tokens"] for s, v in splits.items()},
        "splits": splits,
        # s such that E||s x||^2 = d_in over non-BOS, non-outlier train tokens (the released
        # OpenAI training code's single constant; see PAPER.md "Input normalisation").
        "norm_scale": math.sqrt(d_in / mean_sq_norm),
        "mean_sq_norm": mean_sq_norm,
        "median_norm": median_norm,
        "outlier_threshold": threshold if math.isfinite(threshold) else None,
        "outlier_fraction": float(1 - inliers.mean()),
        "sample": {"file": "sample.npy", "tokens": int(len(sample)), "crc32": sh.file_crc32(cache_dir / "sample.npy")},
        "complete": True,  # last key: readers trust nothing else until it is there
    }


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


# --- command line ----------------------------------------------------------------------------


def _config_defaults(path: str) -> dict:
    """Flat CacheConfig keys, or a LightningCLI config's `data.init_args.cache` section."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    section = cfg.get("data", cfg)
    if isinstance(section, dict):
        section = section.get("init_args", section)
        section = section.get("cache", section)
    names = {f.name for f in dataclasses.fields(CacheConfig)}
    return {k: v for k, v in section.items() if k in names} if isinstance(section, dict) else {}


def main(argv: Sequence[str] | None = None) -> BuildResult | list:
    from jsonargparse import ArgumentParser

    from sae_lit.common import one_line_errors

    parser = one_line_errors(ArgumentParser)(prog="python -m sae_lit.data.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with CacheConfig keys, or a LightningCLI config (its data: section)")
    parser.add_class_arguments(CacheConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="build nothing: re-read every shard of the cache in cache_dir and check it (exit 1 if damaged)")
    args = parser.parse_args(argv)
    if args.config:  # the file's values become defaults; flags given on the command line win
        parser.set_defaults(_config_defaults(args.config))
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verify:
        manifest, problems = verify_cache(args.cache_dir, progress=not args.quiet)
        n = sum(len(split["shards"]) for split in manifest.get("splits", {}).values())
        for file, problem in problems:
            print(f"DAMAGED {Path(args.cache_dir) / file}: {problem}")
        if problems:
            print(f"{args.cache_dir}: {len(problems)} problem(s) in {n} shard(s). Delete the damaged shard files and run "
                  f"the build again to rebuild just those.")
            raise SystemExit(1)
        print(f"{args.cache_dir}: OK, {n} shards, every block's checksum and config fingerprint verified.")
        return problems
    cfg = CacheConfig(**{f.name: args[f.name] for f in dataclasses.fields(CacheConfig)})
    rank, world, barrier, device = _launched_ranks(cfg)
    result = build_cache(cfg, progress=not args.quiet, rank=rank, world=world, barrier=barrier, device=device)
    if rank != 0:
        return result
    m = result.manifest
    print(
        f"{cfg.cache_dir}: {m['train_tokens']} train + {m['val_tokens']} val tokens, d_in {m['d_in']}, "
        f"norm_scale {m['norm_scale']:.4g}"
        + (f", {result.tokens_per_second:.0f} tokens/s" if result.tokens_computed else " (already complete)")
    )
    return result


def _launched_ranks(cfg: CacheConfig):
    """(rank, world, barrier, device) when started by torchrun (or any launcher that sets
    RANK / WORLD_SIZE / LOCAL_RANK): a gloo group for the barriers, and on GPUs this rank's own
    GPU for the subject model. One process otherwise."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None, None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    device = None
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return dist.get_rank(), dist.get_world_size(), dist.barrier, device


if __name__ == "__main__":
    run_cli(main)
