"""The activation cache built by two ranks (gloo, CPU) equals the one-rank build, and an
interrupted two-rank build resumes to the same result."""
import json
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import tiny_cache_kwargs
from distributed import spawn
from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache


class _Stop(Exception):
    pass


def _build_worker(rank, world, kwargs, stop_after):
    def on_shard(path):
        if stop_after is not None and rank == 1:
            raise _Stop(path)  # rank 1 dies after its first shard; rank 0 is killed with it

    build_cache(CacheConfig(**kwargs), progress=False, rank=rank, world=world, barrier=dist.barrier,
                on_shard=on_shard)


def _files(cache_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if p.suffix in (".tar", ".npy")}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir, tiny_corpus):
    kw = tiny_cache_kwargs(tmp_path_factory.mktemp("one") / "cache", tiny_model_dir, tiny_corpus)
    return build_cache(CacheConfig(**kw), progress=False).manifest, Path(kw["cache_dir"])


def _same_as_one_rank(one_rank, cache_dir: Path):
    manifest, one_dir = one_rank
    got = json.loads((cache_dir / sh.MANIFEST).read_text())
    assert got == manifest  # same blocks per shard, totals, statistics
    assert _files(cache_dir) == _files(one_dir)  # byte for byte


def test_two_rank_build_equals_one_rank_build(one_rank, tmp_path, tiny_model_dir, tiny_corpus):
    kw = tiny_cache_kwargs(tmp_path / "cache", tiny_model_dir, tiny_corpus)
    spawn(_build_worker, 2, kw, None)
    _same_as_one_rank(one_rank, Path(kw["cache_dir"]))


@pytest.mark.slow
def test_interrupted_two_rank_build_resumes(one_rank, tmp_path, tiny_model_dir, tiny_corpus):
    kw = tiny_cache_kwargs(tmp_path / "cache", tiny_model_dir, tiny_corpus)
    with pytest.raises(Exception, match="_Stop"):
        spawn(_build_worker, 2, kw, 1)
    cache_dir = Path(kw["cache_dir"])
    assert not json.loads((cache_dir / sh.MANIFEST).read_text())["complete"]
    partial = set(_files(cache_dir))
    assert partial and len(partial) < len(_files(one_rank[1]))
    spawn(_build_worker, 2, kw, None)
    _same_as_one_rank(one_rank, cache_dir)
