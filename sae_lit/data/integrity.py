"""Is what is on disk what was written, for this config? The build lock, the check of a shard a
resumed build finds on disk, the non-finite rows a manifest records, and verify_cache (behind
`python -m sae_lit.data.cache --verify`)."""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from sae_lit.data import shards as sh

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


@contextmanager
def build_lock(cache_dir: Path):
    """An exclusive fcntl lock on `<cache_dir>/.lock` for the duration of a build: a second
    builder on the same folder (another process, another node on a shared filesystem) waits
    instead of computing every shard again. Released by the OS if the holder dies."""
    fd = os.open(Path(cache_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the activation cache in %s; waiting for it to finish", cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def nonfinite_shards(manifest: dict) -> dict[str, int]:
    """{shard file: tokens with NaN / Inf activations} over both splits (empty for a clean cache)."""
    return {
        s["file"]: sum(len(v) for v in s.get("nonfinite", {}).values())
        for split in manifest.get("splits", {}).values()
        for s in split["shards"]
        if s.get("nonfinite")
    }


def existing_shard(path, split: str, first: int, n_blocks: int, context_length: int, dtype: str, fingerprint: str,
                   cache_dir) -> dict | None:
    """A shard already on disk (a resumed build, or a cache whose manifest was lost): refused if
    another config produced it, rebuilt (None) if damaged, else kept: returns its non-finite
    rows. It is read in full, which also checks every checksum."""
    try:
        key, config = sh.shard_provenance(str(path))
    except sh.CorruptShardError as e:
        log.warning("rebuilding %s: %s", path, e)
        return None
    if config != fingerprint:
        made = "by a version of sae_lit without provenance records" if config is None else f"for config {config}"
        raise sh.ManifestMismatchError(
            f"{path} was built {made}, not for this configuration ({fingerprint}): the folder holds another "
            f"cache, and its manifest.json is gone or out of date. Delete {cache_dir} to rebuild it, or set "
            f"cache_dir to a new folder."
        )
    try:
        if key != sh.block_key(split, first):
            raise sh.CorruptShardError(path, f"it starts with block {key}, not {sh.block_key(split, first)}")
        nonfinite = {}
        for block in sh.iter_shard(str(path), n_blocks, first_block=first, config=fingerprint):
            if block.acts.ndim != 2 or block.acts.shape[0] != context_length:
                raise sh.CorruptShardError(path, f"block {block.key} has acts of shape {block.acts.shape}")
            bad = sh.nonfinite_positions(block.acts, dtype)
            if bad:
                nonfinite[str(block.index)] = bad
        return nonfinite
    except sh.CorruptShardError as e:
        log.warning("rebuilding %s: %s", path, e)
        return None


def verify_cache(cache_dir: str | os.PathLike, progress: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """Re-read every shard of the cache in `cache_dir` in full - structure, block sequence,
    shapes, checksums, the config fingerprint of each block, the non-finite counts the manifest
    records - and sample.npy's checksum. Returns (the manifest, [(file, problem)]); no problems
    means every byte the data module will read is as written."""
    cache_dir = Path(cache_dir)
    manifest = sh.read_manifest(cache_dir)
    if manifest is None:
        raise sh.CacheError(f"{cache_dir} holds no {sh.MANIFEST}: not an activation cache (or its build never started).")
    sh.check_manifest(manifest, {"format_version": sh.FORMAT_VERSION}, cache_dir)
    problems = []
    if not manifest.get("complete"):
        return manifest, [(sh.MANIFEST, "the build has not finished (complete: false); run it again to finish")]
    fingerprint = manifest["config_fingerprint"]
    if sh.config_fingerprint(manifest) != fingerprint:
        problems.append((sh.MANIFEST, "its configuration keys do not match its config_fingerprint (edited by hand?)"))
    shape = (int(manifest["context_length"]), int(manifest["d_in"]))
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    bar = tqdm(total=len(shards), unit="shard", desc="verifying", disable=not progress)
    for s in shards:
        url = str(cache_dir / s["file"])
        try:
            nonfinite = {}
            for block in sh.iter_shard(url, s["blocks"], shape, first_block=s["first_block"], config=fingerprint):
                bad = sh.nonfinite_positions(block.acts, manifest["dtype"])
                if bad:
                    nonfinite[str(block.index)] = bad
            if nonfinite != s.get("nonfinite", {}):
                problems.append((s["file"], f"non-finite rows {nonfinite} differ from the manifest's {s.get('nonfinite', {})}"))
        except sh.CorruptShardError as e:
            problems.append((s["file"], e.reason))
        bar.update(1)
    bar.close()
    sample = manifest["sample"]
    path = cache_dir / sample["file"]
    if not path.exists():
        problems.append((sample["file"], "missing"))
    elif sh.file_crc32(path) != sample["crc32"]:
        problems.append((sample["file"], "does not match its checksum"))
    return manifest, problems
