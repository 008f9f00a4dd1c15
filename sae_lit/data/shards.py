"""The on-disk cache: manifest.json and WebDataset tar shards (see DESIGN.md, "Shards").

A shard `<split>-%06d.tar` holds consecutive blocks; block k of a split has the WebDataset key
`<split>-%09d` and three members: `<key>.acts.npy` [T, d] (float16, or bfloat16 bits as uint16),
`<key>.tokens.npy` [T] int32 and `<key>.meta.json`. Shards are plain uncompressed tars, so
`webdataset.WebDataset` and `tar tf` read them too.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sae_lit.common import commit, discard, temp_name

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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
        self.path = str(path)
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


def read_manifest(cache_dir: str | os.PathLike) -> dict | None:
    if is_url(cache_dir):
        url = join(cache_dir, MANIFEST)
        try:
            text = read_bytes(url)
        except Exception as e:  # curl / fsspec / pipe errors differ by scheme
            raise CacheError(f"cannot read {url} ({type(e).__name__}: {e}): a remote cache_dir must hold a complete "
                             "cache (build it locally, then upload the folder)") from None
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{url} is not valid JSON ({e})") from None
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); delete {cache_dir} to rebuild the cache.") from None


def check_manifest(manifest: dict, expected: dict, cache_dir) -> None:
    """Refuse a cache built for another config: reusing it would silently train on the wrong
    activations."""
    diffs = [(k, manifest.get(k), expected[k]) for k in MATCH_KEYS if k in expected and manifest.get(k) != expected[k]]
    if diffs:
        lines = "\n".join(f"  {k}: cache has {have!r}, config asks for {want!r}" for k, have, want in diffs)
        raise ManifestMismatchError(
            f"The activation cache in {cache_dir} was built with a different configuration:\n{lines}\n"
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


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --- writing ----------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard under a temporary name and renames it into place on close, so a shard
    file that exists is complete; an interrupted build leaves only a `.tmp` to overwrite.
    Members get fixed mtimes and owners so a rebuilt shard is byte-identical."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, acts: np.ndarray, tokens: np.ndarray, meta: dict) -> None:
        for ext, data in (
            ("acts.npy", _npy_bytes(acts)),
            ("tokens.npy", _npy_bytes(tokens.astype(np.int32, copy=False))),
            ("meta.json", json.dumps(meta, sort_keys=True).encode()),
        ):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        commit(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
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
) -> Iterator[Block]:
    """Stream the blocks of one shard in order. `keep(index) -> bool` skips blocks without
    decoding them (how ranks and workers share a shard). Any damage - an unreadable tar, a block
    with missing members or wrong shape, fewer blocks than the manifest lists (a tar cut at a
    member boundary still parses) - raises CorruptShardError naming the shard."""
    n = 0
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            current, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key != current:
                    if current is not None:
                        n += 1
                        block = _finish(url, current, parts, keep, shape, with_meta)
                        if block is not None:
                            yield block
                    current, parts = key, {}
                idx = block_index(key)
                if keep is None or keep(idx):
                    if ext != "meta.json" or with_meta:
                        parts[ext] = tar.extractfile(member).read()
                else:
                    parts[ext] = b""
            if current is not None:
                n += 1
                block = _finish(url, current, parts, keep, shape, with_meta)
                if block is not None:
                    yield block
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise CorruptShardError(url, f"{type(e).__name__}: {e}") from e
    if expected_blocks is not None and n != expected_blocks:
        raise CorruptShardError(url, f"{n} blocks, the manifest lists {expected_blocks}")


def _finish(url, key, parts, keep, shape, with_meta) -> Block | None:
    idx = block_index(key)
    missing = {"acts.npy", "tokens.npy"} - set(parts) | ({"meta.json"} - set(parts) if with_meta else set())
    if missing:
        raise CorruptShardError(url, f"block {key} lacks {sorted(missing)}")
    if keep is not None and not keep(idx):
        return None
    acts = np.load(io.BytesIO(parts["acts.npy"]), allow_pickle=False)
    tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
    if shape is not None and (acts.shape != tuple(shape) or tokens.shape != (shape[0],)):
        raise CorruptShardError(url, f"block {key} has acts {acts.shape}, tokens {tokens.shape}; expected {tuple(shape)}")
    meta = json.loads(parts["meta.json"]) if with_meta else None
    return Block(key, idx, tokens, acts, meta)


def read_block(url: str, index: int, split: str, shape=None) -> Block:
    """One block by random access (local files only), for sampling without reading whole shards."""
    key = block_key(split, index)
    try:
        with tarfile.open(url, "r:") as tar:
            arrays = {ext: tar.extractfile(f"{key}.{ext}").read() for ext in ("acts.npy", "tokens.npy")}
            meta = json.loads(tar.extractfile(f"{key}.meta.json").read())
        acts = np.load(io.BytesIO(arrays["acts.npy"]), allow_pickle=False)
        tokens = np.load(io.BytesIO(arrays["tokens.npy"]), allow_pickle=False)
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as e:
        raise CorruptShardError(url, f"reading block {key}: {type(e).__name__}: {e}") from e
    if shape is not None and acts.shape != tuple(shape):
        raise CorruptShardError(url, f"block {key} has acts {acts.shape}; expected {tuple(shape)}")
    return Block(key, index, tokens, acts, meta)
