"""A cache read from a URL (a loopback HTTP server started here, and a pipe: command)
streams exactly what the local folder streams: the same batches, the same resume, the same
split between ranks, the same validation batches."""
import functools
import itertools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_datamodule
from sae_lit.data import shards as sh


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """The tiny cache built locally, and served over http://127.0.0.1 from its parent folder."""
    from conftest import tiny_cache_kwargs

    kwargs = tiny_cache_kwargs(tmp_path_factory.mktemp("remote") / "cache", tiny_model_dir, tiny_corpus)
    make_datamodule(kwargs, progress=False).prepare_data()
    root = Path(kwargs["cache_dir"]).parent
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield kwargs, f"http://127.0.0.1:{server.server_address[1]}/cache/"
    server.shutdown()


def _dm(kwargs, cache_dir=None, rank=None, world=None, step=0, **kw):
    dm = make_datamodule({**kwargs, **({"cache_dir": cache_dir} if cache_dir else {})},
                         **{"batch_size": 32, "shuffle_buffer": 128, "progress": False, **kw})
    if rank is not None:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=step, accumulate_grad_batches=1)
    dm.setup("fit")
    return dm


def _same_batches(a, b, n):
    for x, y in zip(itertools.islice(a, n), itertools.islice(b, n), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("scheme", ["http", "pipe"])
def test_remote_cache_streams_what_the_local_one_does(served, scheme):
    kwargs, url = served
    if scheme == "pipe":
        url = f"pipe:cat {kwargs['cache_dir']}/{{}}"
    local, remote = _dm(kwargs), _dm(kwargs, url)
    assert remote.manifest == local.manifest and remote.d_in == local.d_in
    assert torch.equal(remote.init_sample(100), local.init_sample(100))
    _same_batches(remote.train_dataloader(), local.train_dataloader(), 12)
    _same_batches(remote.val_dataloader(), local.val_dataloader(), 100)
    assert [t.shape for t, _ in remote.iter_blocks("val")] == [t.shape for t, _ in local.iter_blocks("val")]


def test_remote_resume_and_rank_split_are_the_local_ones(served):
    kwargs, url = served
    # Resume: a trainer at step 5 fast-forwards past the 5 batches already trained on.
    _same_batches(_dm(kwargs, url, 0, 1, step=5).train_dataloader(), itertools.islice(_dm(kwargs).train_dataloader(), 5, None), 6)
    for rank in (0, 1):
        remote, local = _dm(kwargs, url, rank, 2), _dm(kwargs, None, rank, 2)
        r_part, l_part = remote.train_dataloader().dataset.part, local.train_dataloader().dataset.part
        assert [s.url for s in r_part.shards] == [url + Path(s.url).name for s in l_part.shards]
        _same_batches(remote.train_dataloader(), local.train_dataloader(), 6)
        assert len(remote.val_dataloader()) == len(local.val_dataloader())
        _same_batches(remote.val_dataloader(), local.val_dataloader(), 100)


def test_urls_are_joined_not_mangled():
    assert sh.join("s3://bucket/caches/q", "train-000000.tar") == "s3://bucket/caches/q/train-000000.tar"
    assert sh.join("gs://b/c/", "manifest.json") == "gs://b/c/manifest.json"
    assert sh.join("pipe:aws s3 cp s3://b/c/{} -", "val-000001.tar") == "pipe:aws s3 cp s3://b/c/val-000001.tar -"
    assert sh.join("data/cache", "x.tar") == str(Path("data/cache") / "x.tar")
    with pytest.raises(ValueError, match="needs {}"):
        sh.join("pipe:cat /data", "x.tar")


def test_a_remote_folder_without_a_cache_says_so(served):
    kwargs, url = served
    with pytest.raises(sh.CacheError, match="remote cache_dir must hold a complete cache"):
        make_datamodule({**kwargs, "cache_dir": url.replace("/cache/", "/nothing/")}, progress=False)
