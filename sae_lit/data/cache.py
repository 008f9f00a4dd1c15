"""Build the activation cache: text -> subject LM (stopped at the hookpoint) -> shards + manifest.

    python -m sae_lit.data.cache --config configs/quickstart.yaml      # uses its data: section
    python -m sae_lit.data.cache --model gpt2 --hookpoint resid_post.8 --cache_dir data/cache/gpt2-l8

The build is deterministic (document order, packing, block numbering depend only on the
config), so an interrupted build resumes at shard granularity: shards already on disk are
skipped (their text is re-tokenised, which is cheap, but not re-run through the model) and the
result is identical to an uninterrupted build.

Spread over ranks (``torchrun --nproc-per-node N -m sae_lit.data.cache ...``, or the data
module under a multi-process Trainer): every rank packs the whole text (cheap) and runs the
subject model on the shards it owns, shard i of the build going to rank i mod N; rank 0 then
reads the statistics back and commits the one manifest. The shards and the manifest are
those of a one-rank build, and an interrupted build resumes the same way. cache_dir must be
storage every rank sees.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sae_lit.common import atomic_path, bf16_speedup, write_json_atomic
from sae_lit.data import shards as sh
from sae_lit.data.corpus import make_corpus, pack_contexts, special_ids
from sae_lit.data.subject import (
    HookedForward, canonical_model, hookpoint_info, hub_name, load_model, load_tokenizer, resolve_device,
)

log = logging.getLogger(__name__)

SUBJECT_DTYPES = ("auto", "float32", "bfloat16")


def resolve_subject_dtype(requested: str, device: torch.device, d_model: int) -> str:
    """The subject model's dtype for ``requested`` ("auto" decided by measurement on CPUs)."""
    if requested != "auto":
        return requested
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
    manifest = sh.read_manifest(cache_dir)
    if manifest is not None:
        sh.check_manifest(manifest, expected, cache_dir)
        if manifest.get("complete") and not missing_shards(cache_dir, manifest):
            return BuildResult(manifest, 0.0, 0)
    device = resolve_device(cfg.device if device is None else str(device))
    if subject is not None:
        dtype = str(next(subject[0].parameters()).dtype).removeprefix("torch.")
    elif manifest is not None and manifest.get("subject_dtype"):
        dtype = manifest["subject_dtype"]  # a resumed build goes on as it started (auto included)
    else:
        dtype = resolve_subject_dtype(cfg.subject_dtype, device, hookpoint_info(cfg.model, cfg.hookpoint)[1])
    if rank == 0:
        # Recorded before any shard, so a resumed build is checked against the config it started with.
        write_json_atomic(cache_dir / sh.MANIFEST, {**expected, "subject_dtype": dtype, "complete": False})
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
    bar = _progress_bar(sum(targets.values()) * cfg.context_length // world, progress and rank == 0)
    start, computed, splits, first_shard = time.perf_counter(), 0, {}, 0
    try:
        for split in ("train", "val"):
            # Shard i of the whole build (train first) is rank i mod world's.
            owns = lambda i, base=first_shard: (base + i) % world == rank  # noqa: E731
            splits[split], n = _write_split(cfg, split, targets[split], corpus, tokenizer, forward, device, bar,
                                            on_shard, owns)
            computed += n
            first_shard += len(splits[split]["shards"])
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    if barrier is not None:
        barrier()  # every rank's shards are on disk
    if rank == 0:
        manifest = _finalize(cfg, expected, splits, tokenizer, forward)
        write_json_atomic(cache_dir / sh.MANIFEST, manifest)
    if barrier is not None:
        barrier()
        manifest = sh.read_manifest(cache_dir)
    log.info("activation cache complete: %s (%.0f tokens/s%s)", cache_dir, computed / max(seconds, 1e-9),
             f" on rank {rank} of {world}" if world > 1 else "")
    return BuildResult(manifest, seconds, computed)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="caching activations", disable=not enabled, smoothing=0.1)


def _write_split(cfg, split, n_blocks, corpus, tokenizer, forward, device, bar, on_shard, owns=None) -> tuple[dict, int]:
    T, bps = cfg.context_length, cfg.blocks_per_shard
    contexts = itertools.islice(pack_contexts(corpus.documents(split), tokenizer, T), n_blocks)
    shards, computed, first = [], 0, 0
    for index in itertools.count():
        batch = list(itertools.islice(contexts, bps))
        if not batch:
            break
        path = Path(cfg.cache_dir) / sh.shard_name(split, index)
        if owns is not None and not owns(index):
            pass  # another rank's
        elif not path.exists():
            _write_shard(path, split, first, batch, forward, device, cfg, bar)
            computed += len(batch) * T
            if on_shard is not None:
                on_shard(str(path))
        else:
            bar.update(len(batch) * T)
        shards.append({"file": path.name, "blocks": len(batch), "first_block": first})
        first += len(batch)
    if first < n_blocks:
        log.warning(
            "corpus %s ran out: the %s split has %d tokens, %d were asked for.",
            cfg.corpus, split, first * T, n_blocks * T,
        )
    if first == 0:
        raise ValueError(f"The {split} split of corpus {cfg.corpus!r} is empty; add text or raise val_fraction ({cfg.val_fraction}).")
    return {"tokens": first * T, "blocks": first, "shards": shards}, computed


def _write_shard(path, split, first, batch, forward, device, cfg, bar) -> None:
    tokens = np.stack([c.tokens for c in batch])
    writer = sh.ShardWriter(path)
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
            bar.update(len(acts) * cfg.context_length)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _finalize(cfg, expected, splits, tokenizer, forward) -> dict:
    """Statistics, read back from disk so a resumed build gets the same.

    A sample of non-BOS train tokens spread over the whole split (not the first shard: one shard
    is only a few dozen documents) gives the median norm, the outlier threshold and the
    normalisation constant. Outliers are the "massive activations" some models put on a token
    near the start of a context (SmolLM2: ~3% of contexts, position 1, norm ~100x the median);
    left in, a handful of them outweighs the whole rest of a batch in the MSE."""
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
        for block in sh.iter_shard(str(cache_dir / shard["file"]), shard["blocks"], keep=wanted.__contains__, with_meta=False):
            positions = 1 + rng.choice(T - 1, size=per_block, replace=False)
            rows.append(block.acts[np.sort(positions)])
    sample = np.concatenate(rows)
    sample = sample[rng.permutation(len(sample))]  # any prefix is then an unbiased subsample
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
    # record how many non-BOS tokens of each val block are inliers.
    for shard in splits["val"]["shards"]:
        blocks = sh.iter_shard(str(cache_dir / shard["file"]), shard["blocks"], with_meta=False)
        shard["inliers"] = [int((sh.row_norms(b.acts[1:], cfg.dtype) <= threshold).sum()) for b in blocks]

    bos, sep = special_ids(tokenizer)
    return {
        **expected,
        "corpus": cfg.corpus if isinstance(cfg.corpus, str) else list(cfg.corpus),
        "model_name": hub_name(cfg.model),
        "hook_name": forward.hookpoint.module_path,
        "d_in": d_in,
        "bos_token_id": int(bos),
        "separator_token_id": int(sep),
        "train_tokens": train["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "num_shards": {s: len(v["shards"]) for s, v in splits.items()},
        "splits": splits,
        # s such that E||s x||^2 = d_in over non-BOS, non-outlier train tokens (the released
        # OpenAI training code's single constant; see PAPER.md "Input normalisation").
        "norm_scale": math.sqrt(d_in / mean_sq_norm),
        "mean_sq_norm": mean_sq_norm,
        "median_norm": median_norm,
        "outlier_threshold": threshold if math.isfinite(threshold) else None,
        "outlier_fraction": float(1 - inliers.mean()),
        "sample": {"file": "sample.npy", "tokens": int(len(sample))},
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


def main(argv: Sequence[str] | None = None) -> BuildResult:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m sae_lit.data.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML with CacheConfig keys, or a LightningCLI config (its data: section)")
    parser.add_class_arguments(CacheConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.config:  # the file's values become defaults; flags given on the command line win
        parser.set_defaults(_config_defaults(args.config))
        args = parser.parse_args(argv)
    cfg = CacheConfig(**{f.name: args[f.name] for f in dataclasses.fields(CacheConfig)})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
    main()
