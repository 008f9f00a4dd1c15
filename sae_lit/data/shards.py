"""The on-disk cache: manifest.json and WebDataset tar shards (see DESIGN.md, "Shards").

A shard `<split>-%06d.tar` holds consecutive blocks; block k of a split has the WebDataset key
`<split>-%09d` and four members: `<key>.acts.npy` [T, d] (float16, or bfloat16 bits as uint16),
`<key>.tokens.npy` [T] int32, `<key>.meta.json`, and `<key>.check.json`:
{"config": the fingerprint of the config that produced the block, "crc32": {member: CRC32}}.
The fingerprint lets a cache whose manifest was lost be checked against the config that wants
it; the CRC32s catch bytes flipped after writing (checked on every read). Shards are plain
uncompressed tars, so `webdataset.WebDataset` and `tar tf` read them too.

Format versions: 1 had no check.json; 2 adds it. A cache of another version is refused (delete
and rebuild), never read approximately.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sae_lit.common import commit, discard, temp_name, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
# Members of one block, in the order they are written.
MEMBERS = ("acts.npy", "tokens.npy", "meta.json", "check.json")
_MEMBER_NAME = re.compile(r"^((?:train|val)-(\d{9}))\.(acts\.npy|tokens\.npy|meta\.json|check\.json)$")
DTYPES = ("float16", "bfloat16")
# Keys a cache must share with the config that wants to use it; anything else (counts, norm
# constant) is derived from these.
MATCH_KEYS = (
    "format_version",
    "model",
    "hookpoint",
    "dtype",
    "context_length",
    "source_fingerprint",
    "train_tokens_requested",
    "val_tokens_requested",
    "blocks_per_shard",
    "outlier_factor",
    "subject_dtype",
)


class CacheError(RuntimeError):
    pass


class ManifestMismatchError(CacheError):
    pass


class CorruptShardError(CacheError):
    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(
            f"Shard {path} is corrupt or truncated ({reason}). Delete that file and run prepare_data() / "
            f"`python -m sae_lit.data.cache` again to rebuild just that shard, or set skip_corrupt_shards=True to skip it."
        )


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def block_key(split: str, index: int) -> str:
    return f"{split}-{index:09d}"


def block_index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def config_fingerprint(expected: dict) -> str:
    """A short hash of the keys that decide a cache's content (MATCH_KEYS), stored in every block."""
    pinned = {k: expected.get(k) for k in MATCH_KEYS}
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:16]


# --- manifest ---------------------------------------------------------------------------------


def is_url(location: str | os.PathLike) -> bool:
    """Remote storage (http(s)://, s3://, gs://, ... or a pipe: command) rather than a local path."""
    return isinstance(location, str) and ("://" in location or location.startswith("pipe:"))


def join(cache_dir: str | os.PathLike, name: str) -> str:
    """The location of a file of the cache: a path, or a URL (Path would turn s3://b into
    s3:/b). A pipe: cache_dir is a command with {} where the file name goes, e.g.
    "pipe:aws s3 cp s3://bucket/cache/{} -"."""
    if not is_url(cache_dir):
        return str(Path(cache_dir) / name)
    if cache_dir.startswith("pipe:"):
        if "{}" not in cache_dir:
            raise ValueError(f"a pipe: cache_dir needs {{}} where the file name goes, e.g. 'pipe:cat /data/{{}}'; got {cache_dir!r}")
        return cache_dir.replace("{}", name)
    return cache_dir.rstrip("/") + "/" + name


def read_bytes(url: str) -> bytes:
    """A whole (small) file of a local or remote cache."""
    with _open(url) as f:
        return f.read()


def manifest_checksum(manifest: dict) -> int:
    """CRC32 of a manifest's content (every key but "crc32" itself)."""
    return zlib.crc32(json.dumps({k: v for k, v in manifest.items() if k != "crc32"}, sort_keys=True).encode())


def write_manifest(cache_dir: str | os.PathLike, manifest: dict) -> dict:
    """Write manifest.json atomically with its checksum; "complete" stays the last key. Returns
    what was written."""
    body = {k: v for k, v in manifest.items() if k not in ("crc32", "complete")}
    complete = bool(manifest.get("complete", False))
    out = {**body, "crc32": manifest_checksum({**body, "complete": complete}), "complete": complete}
    write_json_atomic(Path(cache_dir) / MANIFEST, out)
    return out


def read_manifest(cache_dir: str | os.PathLike) -> dict | None:
    if is_url(cache_dir):
        url = join(cache_dir, MANIFEST)
        try:
            text = read_bytes(url)
        except Exception as e:  # curl / fsspec / pipe errors differ by scheme
            raise CacheError(f"cannot read {url} ({type(e).__name__}: {e}): a remote cache_dir must hold a complete "
                             "cache (build it locally, then upload the folder)") from None
        try:
            manifest = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{url} is not valid JSON ({e})") from None
        if isinstance(manifest, dict) and manifest.get("crc32") not in (None, manifest_checksum(manifest)):
            raise CacheError(f"{url} does not match its checksum (changed in storage or in transit): upload the "
                             "cache folder again")
        return manifest
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    remedy = (f"Delete {path} and run the build again: it is rebuilt from the shards (each checked against the "
              f"config), or delete {cache_dir} to rebuild the whole cache.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}). {remedy}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is not a manifest (a JSON object). {remedy}")
    crc = manifest.get("crc32")
    if crc is None and manifest.get("format_version", 1) != 1:
        raise CacheError(f"{path} has no checksum (changed on disk or by hand). {remedy}")
    if crc is not None and crc != manifest_checksum(manifest):
        raise CacheError(f"{path} does not match its checksum (changed on disk or by hand). {remedy}")
    return manifest


def check_manifest(manifest: dict, expected: dict, cache_dir) -> None:
    """Refuse a cache built for another config: reusing it would silently train on the wrong
    activations."""
    version = manifest.get("format_version")
    if "format_version" in expected and version != expected["format_version"]:
        raise ManifestMismatchError(
            f"The activation cache in {cache_dir} has format version {version!r}; this sae_lit reads version "
            f"{FORMAT_VERSION} (every block now carries a checksum and the fingerprint of its config). Delete "
            f"{cache_dir} and build it again (prepare_data() or `python -m sae_lit.data.cache`), or set cache_dir "
            f"to a new folder."
        )
    diffs = [(k, manifest.get(k), expected[k]) for k in MATCH_KEYS if k in expected and manifest.get(k) != expected[k]]
    if diffs:
        listed = "; ".join(f"{k}: cache has {have!r}, config asks for {want!r}" for k, have, want in diffs)
        raise ManifestMismatchError(
            f"The activation cache in {cache_dir} was built with a different configuration ({listed}). "
            f"Delete {cache_dir} to rebuild it, or set cache_dir to a new folder."
        )


# --- activations <-> storage ------------------------------------------------------------------


def encode_acts(acts: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return acts.to(torch.float16).cpu().numpy()
    if dtype == "bfloat16":
        # numpy has no bfloat16; the bits travel as uint16.
        return acts.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")


def decode_acts(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array -> float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(arr)).float()


def row_norms(arr: np.ndarray, dtype: str) -> np.ndarray:
    """L2 norm of each row of a storage array, in float32."""
    x = decode_acts(arr, dtype).numpy() if dtype == "bfloat16" else arr.astype(np.float32)
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def finite_rows(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Bool [T]: rows of a storage array whose values are all finite (no NaN / Inf)."""
    if dtype == "bfloat16":
        # All-ones exponent bits: Inf or NaN.
        return ((np.ascontiguousarray(arr).view(np.uint16) & 0x7F80) != 0x7F80).all(-1)
    return np.isfinite(arr).all(-1)


def nonfinite_positions(arr: np.ndarray, dtype: str) -> list[int]:
    """Positions of the rows of a block's storage array that hold a NaN or an Inf."""
    return np.flatnonzero(~finite_rows(arr, dtype)).tolist()


def file_crc32(path: str | os.PathLike) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --- writing ----------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard under a temporary name and renames it into place on close, so a shard
    file that exists is complete; an interrupted build leaves only a `.tmp` to overwrite.
    Members get fixed mtimes and owners so a rebuilt shard is byte-identical. `config` is the
    fingerprint (config_fingerprint) recorded in every block."""

    def __init__(self, path: str | os.PathLike, config: str):
        self.path = Path(path)
        self.config = config
        self.tmp = temp_name(self.path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, acts: np.ndarray, tokens: np.ndarray, meta: dict) -> None:
        data = {
            "acts.npy": _npy_bytes(acts),
            "tokens.npy": _npy_bytes(tokens.astype(np.int32, copy=False)),
            "meta.json": json.dumps(meta, sort_keys=True).encode(),
        }
        check = {"config": self.config, "crc32": {ext: zlib.crc32(b) for ext, b in data.items()}}
        data["check.json"] = json.dumps(check, sort_keys=True).encode()
        for ext in MEMBERS:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data[ext]))

    def close(self) -> None:
        try:
            self._tar.close()
            commit(self.tmp, self.path)
        except BaseException:
            discard(self.tmp)
            raise

    def abort(self) -> None:
        """Drop the shard in progress. Never raises: it runs on error paths (a full disk makes
        the tar's final flush fail again), where the first error is the one to report."""
        try:
            self._tar.close()
        except Exception:
            pass
        discard(self.tmp)


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Block:
    key: str
    index: int  # block number within its split
    tokens: np.ndarray  # [T] int32
    acts: np.ndarray  # [T, d] in storage dtype (float16, or uint16 holding bfloat16)
    meta: dict | None


def _open(url: str):
    if not is_url(url):
        return open(url, "rb")
    if url.startswith(("pipe:", "http://", "https://", "file://")):
        import webdataset as wds  # its gopen runs pipe: commands, and curl for http(s)

        return wds.gopen(url, "rb")
    import fsspec  # s3://, gs://, ... (needs that filesystem's package, e.g. s3fs, gcsfs)

    return fsspec.open(url, "rb").open()


def iter_shard(
    url: str,
    expected_blocks: int | None = None,
    shape: tuple[int, int] | None = None,
    keep=None,
    with_meta: bool = True,
    *,
    first_block: int | None = None,
    config: str | None = None,
) -> Iterator[Block]:
    """Stream the blocks of one shard in order. `keep(index) -> bool` skips blocks without
    decoding them (how ranks and workers share a shard). Any damage - an unreadable tar, a
    member name outside the format, a block with missing members, a wrong shape or a checksum
    that does not match, blocks out of sequence (from `first_block` when given), fewer blocks
    than the manifest lists (a tar cut at a member boundary still parses), or a block produced
    by another config (`config`: the expected fingerprint) - raises CorruptShardError naming
    the shard. Member names are only parsed, never used as paths."""
    n, start = 0, first_block
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            current, parts = None, {}
            for member in tar:
                m = _MEMBER_NAME.match(member.name)
                if m is None or not member.isfile():
                    raise CorruptShardError(url, f"unexpected member {member.name!r} (not part of an activation shard)")
                key, idx, ext = m.group(1), int(m.group(2)), m.group(3)
                if key != current:
                    if current is not None:
                        block = _finish(url, current, parts, keep, shape, with_meta, config)
                        n += 1
                        if block is not None:
                            yield block
                    if current is not None and key.split("-")[0] != current.split("-")[0]:
                        raise CorruptShardError(url, f"block {key} follows {current}: two splits in one shard")
                    start = idx if start is None else start
                    expected_index = start + n
                    if idx != expected_index:
                        raise CorruptShardError(url, f"block {key} where block number {expected_index} belongs")
                    current, parts = key, {}
                if ext in parts:
                    raise CorruptShardError(url, f"block {key} has two {ext} members")
                if (keep is None or keep(idx)) and (ext != "meta.json" or with_meta):
                    parts[ext] = tar.extractfile(member).read()
                else:
                    parts[ext] = None  # present, not read
            if current is not None:
                block = _finish(url, current, parts, keep, shape, with_meta, config)
                n += 1
                if block is not None:
                    yield block
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CorruptShardError(url, f"{type(e).__name__}: {e}") from e
    if expected_blocks is not None and n != expected_blocks:
        raise CorruptShardError(url, f"{n} blocks, the manifest lists {expected_blocks}")


def _checked(url: str, key: str, parts: dict, config: str | None) -> None:
    """Compare each member read against the block's check.json."""
    try:
        check = json.loads(parts["check.json"])
        crcs, block_config = check["crc32"], check["config"]
        for ext, data in parts.items():
            if ext != "check.json" and data is not None and zlib.crc32(data) != int(crcs[ext]):
                raise CorruptShardError(url, f"block {key}: {ext} does not match its checksum (bytes changed on disk)")
    except CorruptShardError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(url, f"block {key}: unreadable check.json ({type(e).__name__}: {e})") from e
    if config is not None and block_config != config:
        raise CorruptShardError(
            url, f"block {key} was produced by another configuration (fingerprint {block_config}, expected {config})"
        )


def _finish(url, key, parts, keep, shape, with_meta, config) -> Block | None:
    idx = block_index(key)
    missing = set(MEMBERS) - set(parts)
    if missing:
        raise CorruptShardError(url, f"block {key} lacks {sorted(missing)}")
    if keep is not None and not keep(idx):
        return None
    _checked(url, key, parts, config)
    acts = np.load(io.BytesIO(parts["acts.npy"]), allow_pickle=False)
    tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
    if shape is not None and (acts.shape != tuple(shape) or tokens.shape != (shape[0],)):
        raise CorruptShardError(url, f"block {key} has acts {acts.shape}, tokens {tokens.shape}; expected {tuple(shape)}")
    meta = json.loads(parts["meta.json"]) if with_meta else None
    return Block(key, idx, tokens, acts, meta)


def read_block(url: str, index: int, split: str, shape=None, config: str | None = None) -> Block:
    """One block by random access (local files only), for sampling without reading whole shards."""
    key = block_key(split, index)
    try:
        with tarfile.open(url, "r:") as tar:
            parts = {ext: tar.extractfile(f"{key}.{ext}").read() for ext in MEMBERS}
        _checked(url, key, parts, config)
        acts = np.load(io.BytesIO(parts["acts.npy"]), allow_pickle=False)
        tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
        meta = json.loads(parts["meta.json"])
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
        raise CorruptShardError(url, f"reading block {key}: {type(e).__name__}: {e}") from e
    if shape is not None and acts.shape != tuple(shape):
        raise CorruptShardError(url, f"block {key} has acts {acts.shape}; expected {tuple(shape)}")
    return Block(key, index, tokens, acts, meta)


def shard_provenance(url: str) -> tuple[str, str | None]:
    """(first block key, config fingerprint) of a shard, from its first block's check.json and
    reading only that far; (key, None) for a block without one (format 1). Raises
    CorruptShardError for a shard that cannot be read that far."""
    first = None
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                m = _MEMBER_NAME.match(member.name)
                if m is None or not member.isfile():
                    raise CorruptShardError(url, f"unexpected member {member.name!r} (not part of an activation shard)")
                first = first or m.group(1)
                if m.group(1) != first:
                    break
                if m.group(3) == "check.json":
                    return first, json.loads(tar.extractfile(member).read())["config"]
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(url, f"{type(e).__name__}: {e}") from e
    if first is None:
        raise CorruptShardError(url, "no blocks")
    return first, None
