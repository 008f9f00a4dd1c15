import itertools
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from sae_lit.data import shards as sh
from sae_lit.data import streams
from sae_lit.data.datamodule import ActivationDataModule
from conftest import make_datamodule


def _dm(cache_kwargs, rank=None, world=None, **kw):
    dm = make_datamodule(cache_kwargs, **{"batch_size": 32, "shuffle_buffer": 128, "progress": False, **kw})
    if rank is not None:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


@pytest.fixture
def built(cache_kwargs):
    dm = _dm(cache_kwargs)
    dm.prepare_data()
    return cache_kwargs


def test_quickstart_path(cache_kwargs):
    dm = _dm(cache_kwargs)
    assert dm.d_in == 32 and dm.norm_scale is None  # from the model config, before any cache
    assert dm.export_metadata() == {
        "model_name": str(Path(cache_kwargs["model"]).resolve()),
        "model_class_name": "HookedTransformer",
        "hook_name": "blocks.1.hook_resid_post",
        "hf_hook_name": "model.layers.1",
        "hookpoint": "resid_post.1",
        "context_size": 16,
        "prepend_bos": True,
    }
    dm.prepare_data()
    dm.setup("fit")
    assert dm.norm_scale > 0
    batches = list(itertools.islice(dm.train_dataloader(), 60))  # several times the cache: endless
    assert all(b.shape == (32, 32) and b.dtype == torch.float32 for b in batches)
    val = list(dm.val_dataloader())
    # The whole split (12 blocks x 15 non-BOS tokens), the last batch partial.
    assert len(val) == len(dm.val_dataloader()) == -(-12 * 15 // 32)
    assert sum(len(b) for b in val) == 12 * 15 and [len(b) for b in val[:-1]] == [32] * (len(val) - 1)
    sample = dm.init_sample(200)
    assert sample.shape == (200, 32) and torch.equal(sample, dm.init_sample(200))
    # A second datamodule on the finished cache takes d_in from the manifest.
    assert _dm(cache_kwargs).manifest["complete"]


def test_with_a_lightning_trainer(built, tmp_path):
    class Probe(L.LightningModule):
        def __init__(self, d_in):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_in)
            self.val_batches = 0

        def training_step(self, x, _):
            return (self.lin(x) - x).pow(2).mean()

        def validation_step(self, x, _):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(built)
    model = Probe(dm.d_in)
    trainer = L.Trainer(
        max_steps=5, val_check_interval=5, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 5 and model.val_batches == -(-12 * 15 // 32)


def test_train_stream_excludes_bos_and_shuffles(built):
    dm = _dm(built, shuffle_buffer=10_000)
    dm.setup()
    blocks = list(dm.iter_blocks("train"))
    bos_rows = torch.stack([a[0] for _, a in blocks])
    body = torch.cat([a[1:] for _, a in blocks])
    # A buffer larger than the split: the first batches are a shuffled full pass of the body.
    first = torch.cat(list(itertools.islice(dm.train_dataloader(), len(body) // 32)))
    assert not any((bos_rows == r).all(-1).any() for r in first)
    assert not torch.equal(first, body[: len(first)])
    body_set = {tuple(r.tolist()) for r in body}
    assert all(tuple(r.tolist()) in body_set for r in first)

    with_bos = _dm(built, exclude_bos=False)
    with_bos.setup()
    assert sum(map(len, with_bos.val_dataloader())) == 12 * 16 and sum(map(len, dm.val_dataloader())) == 12 * 15


def test_val_batches_are_the_val_blocks_in_order(built):
    dm = _dm(built)
    dm.setup()
    body = torch.cat([a[1:] for _, a in dm.iter_blocks("val")])
    val = torch.cat(list(dm.val_dataloader()))
    torch.testing.assert_close(val, body)  # all of it, in order
    assert len(list(dm.iter_blocks("val"))) == 12


def test_two_ranks_read_disjoint_shards(built, monkeypatch):
    opened = {}
    real = streams.iter_shard

    def spy(url, *a, **kw):
        opened.setdefault(current, set()).add(Path(url).name)
        return real(url, *a, **kw)

    monkeypatch.setattr(streams, "iter_shard", spy)
    val = {}
    for current in (0, 1):
        dm = _dm(built, rank=current, world=2)
        dm.setup("fit")
        list(itertools.islice(dm.train_dataloader(), 40))
        val[current] = list(dm.val_dataloader())
    train_shards = {r: {n for n in names if n.startswith("train")} for r, names in opened.items()}
    assert train_shards[0] and train_shards[1] and not train_shards[0] & train_shards[1]
    assert train_shards[0] | train_shards[1] == {f"train-{i:06d}.tar" for i in range(5)}
    assert len(val[0]) == len(val[1]) == -(-6 * 15 // 32)
    # Together the ranks score the whole split once, in order: what one process scores.
    single = _dm(built)
    single.setup()
    torch.testing.assert_close(torch.cat(val[0] + val[1]), torch.cat(list(single.val_dataloader())))
    # init_sample is the same everywhere (the geometric-median init must agree across ranks).
    assert torch.equal(_dm(built, rank=0, world=2).init_sample(100), _dm(built, rank=1, world=2).init_sample(100))


def test_more_ranks_than_shards_share_by_block(built):
    seen, val_rows = [], []
    for rank in range(8):  # 5 train shards, 8 ranks
        dm = _dm(built, rank=rank, world=8, val_batch_size=8)
        dm.setup()
        part = dm.train_dataloader().dataset.part
        seen.append({b for s in part.shards for b in range(s.first_block, s.first_block + s.blocks) if part.keep(b)})
        # 12 val blocks over 8 ranks: 1 or 2 blocks (15 or 30 rows) each, 4 batches everywhere.
        val = list(dm.val_dataloader())
        assert len(val) == len(dm.val_dataloader()) == 4 and all(len(b) > 0 for b in val)
        val_rows.append(sum(map(len, val)))
    assert set().union(*seen) == set(range(40)) and sum(map(len, seen)) == 40
    assert sum(val_rows) == 12 * 15


def test_corrupt_shard_is_named_or_skipped(built):
    cache_dir = Path(built["cache_dir"])
    bad = cache_dir / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[:3000])
    dm = _dm(built)
    dm.setup()
    with pytest.raises(sh.CorruptShardError, match="train-000002.tar"):
        list(itertools.islice(dm.train_dataloader(), 200))

    dm = _dm(built, skip_corrupt_shards=True)
    dm.setup()
    assert len(list(itertools.islice(dm.train_dataloader(), 200))) == 200
    assert dm.skipped_shards == 1


def test_corrupt_val_shard_keeps_batch_counts_equal(built):
    bad = Path(built["cache_dir"]) / "val-000000.tar"
    bad.write_bytes(bad.read_bytes()[:2000])
    dm = _dm(built, rank=0, world=2)
    dm.setup()
    with pytest.raises(sh.CorruptShardError, match="val-000000.tar"):
        list(dm.val_dataloader())
    counts = []
    for rank in (0, 1):
        dm = _dm(built, rank=rank, world=2, skip_corrupt_shards=True)
        dm.setup()
        counts.append(len(list(dm.val_dataloader())))
    assert counts == [len(dm.val_dataloader())] * 2


def test_loader_workers(built):
    dm = _dm(built, num_workers=2)
    dm.setup()
    batches = list(itertools.islice(dm.train_dataloader(), 20))
    assert len(batches) == 20 and all(b.shape == (32, 32) for b in batches)


def test_mismatched_cache_refused_at_construction(built):
    with pytest.raises(sh.ManifestMismatchError, match="hookpoint"):
        _dm(built, hookpoint="resid_post.2")


def test_setup_without_cache_says_what_to_do(cache_kwargs):
    with pytest.raises(sh.CacheError, match="prepare_data"):
        _dm(cache_kwargs).setup("fit")


def test_outliers_are_left_out(cache_kwargs):
    # A factor this low makes a good share of tokens "outliers", exercising the bookkeeping that
    # real massive activations (rare) rely on.
    dm = _dm(cache_kwargs, outlier_factor=1.05, val_batch_size=8)
    dm.prepare_data()
    dm.setup()
    m = dm.manifest
    threshold = m["outlier_threshold"]
    assert threshold == pytest.approx(1.05 * m["median_norm"]) and 0.1 < m["outlier_fraction"] < 0.6
    assert dm.init_sample(100).norm(dim=-1).max() <= threshold * 1.001
    train = torch.cat(list(itertools.islice(dm.train_dataloader(), 30)))
    assert train.norm(dim=-1).max() <= threshold * 1.001
    inliers = sum(n for s in m["splits"]["val"]["shards"] for n in s["inliers"])
    assert inliers < 12 * 15
    val = torch.cat(list(dm.val_dataloader()))
    assert len(val) == inliers and val.norm(dim=-1).max() <= threshold * 1.001
    # Ranks hold different numbers of inliers but yield the same number of batches.
    lens = []
    for rank in (0, 1):
        ranked = _dm(cache_kwargs, rank=rank, world=2, outlier_factor=1.05, val_batch_size=8)
        ranked.setup()
        lens.append((len(ranked.val_dataloader()), len(list(ranked.val_dataloader()))))
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    everything = _dm(cache_kwargs, outlier_factor=1.05, val_batch_size=8, exclude_outliers=False)
    everything.setup()
    assert len(everything.val_dataloader()) == -(-12 * 15 // 8)
