"""Non-finite activations (counted when cached, refused or dropped when read) and a validation
pass that scores the whole split, on one rank or several, with the same totals."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import make_datamodule, tiny_cache_kwargs
from sae_lit.data import cache as cache_mod
from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache
from sae_lit.data.integrity import verify_cache
from sae_lit.data.streams import RowFilter, batch_sizes
from sae_lit.training.metrics import NMSE

POISON = {0: float("nan"), 1: float("inf"), 2: -float("inf")}  # token id % 29 -> value put in its activation


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A cache whose subject model gives NaN / +-Inf at some token ids (about 10% of tokens)."""
    kwargs = tiny_cache_kwargs(tmp_path_factory.mktemp("nan") / "cache", tiny_model_dir, tiny_corpus)
    real = cache_mod.HookedForward.__call__

    def forward(self, ids):
        out = real(self, ids).clone()
        for tok, value in POISON.items():
            out[..., 3][ids % 29 == tok] = value
        return out

    cache_mod.HookedForward.__call__ = forward
    try:
        build_cache(CacheConfig(**kwargs), progress=False)
    finally:
        cache_mod.HookedForward.__call__ = real
    return kwargs


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model_dir, tiny_corpus):
    kwargs = tiny_cache_kwargs(tmp_path_factory.mktemp("clean") / "cache", tiny_model_dir, tiny_corpus)
    build_cache(CacheConfig(**kwargs), progress=False)
    return kwargs


def _dm(kwargs, rank=None, world=None, **kw):
    dm = make_datamodule(kwargs, **{"batch_size": 32, "shuffle_buffer": 64, "progress": False, **kw})
    if rank is not None:
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def _true_nonfinite(kwargs, split):
    m = sh.read_manifest(kwargs["cache_dir"])
    n = 0
    for s in m["splits"][split]["shards"]:
        for b in sh.iter_shard(f"{kwargs['cache_dir']}/{s['file']}"):
            n += int((~sh.finite_rows(b.acts, m["dtype"])).sum())
    return n


# --- non-finite activations ------------------------------------------------------------------------


def test_counted_at_caching_time(poisoned):
    m = sh.read_manifest(poisoned["cache_dir"])
    assert m["nonfinite_tokens"] == {s: _true_nonfinite(poisoned, s) for s in ("train", "val")}
    assert m["nonfinite_tokens"]["train"] > 0 and m["nonfinite_tokens"]["val"] > 0
    assert math.isfinite(m["norm_scale"]) and math.isfinite(m["median_norm"])  # statistics ignore them
    assert verify_cache(poisoned["cache_dir"])[1] == []  # recorded, not damage


@pytest.mark.parametrize("exclude_outliers", [True, False])
def test_refused_by_default_naming_the_shards(poisoned, exclude_outliers):
    """Issue case 2: with outliers kept this trained to NaN; with outliers dropped, the NaN rows
    went with no word said."""
    dm = _dm(poisoned, exclude_outliers=exclude_outliers)
    with pytest.raises(sh.CacheError) as e:
        dm.setup()
    msg = str(e.value)
    assert "NaN/Inf" in msg and "train-000000.tar" in msg and "drop_nonfinite" in msg


@pytest.mark.parametrize("exclude_outliers", [True, False])
@pytest.mark.parametrize("exclude_bos", [True, False])
def test_dropped_with_a_warning_and_exact_counts(poisoned, caplog, exclude_outliers, exclude_bos):
    dm = _dm(poisoned, exclude_outliers=exclude_outliers, exclude_bos=exclude_bos, drop_nonfinite=True)
    dm.setup()
    total = sum(dm.manifest["nonfinite_tokens"].values())
    assert f"leaving out {total} tokens with NaN/Inf" in caplog.text
    train = torch.cat(list(itertools.islice(dm.train_dataloader(), 40)))
    val = list(dm.val_dataloader())
    assert torch.isfinite(train).all() and all(torch.isfinite(b).all() for b in val)
    # The validation batch count (known before reading) matches what is read: every finite row.
    rows = RowFilter(dm.manifest["dtype"], exclude_bos, dm.manifest["outlier_threshold"] if exclude_outliers else None,
                     drop_nonfinite=True)
    body = [rows(b.acts) for s in dm._shards("val") for b in s.read()]
    assert sum(len(b) for b in val) == sum(len(b) for b in body) and len(val) == len(dm.val_dataloader())
    assert torch.isfinite(dm.init_sample(300)).all()
    assert all(torch.isfinite(a).all() for _, a in dm.iter_blocks("val"))  # whole blocks left out


# --- validation: the whole split, the same totals on any number of ranks --------------------------


def test_batch_sizes_cover_rows_exactly():
    for rows, n, b in [(180, 6, 32), (15, 4, 8), (30, 4, 8), (3, 5, 8), (64, 2, 32)]:
        sizes = batch_sizes(rows, n, b)
        assert len(sizes) == n and sum(sizes) == rows and max(sizes) <= b
        assert all(s > 0 for s in sizes) or rows < n


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("val_batch_size", [7, 32, 4096])
def test_ranks_together_score_every_row_once(clean, world, val_batch_size):
    """Issue case 4: whole batches only, remainders dropped per rank (48% of the split unscored
    at 7,873 rows and batch 4,096)."""
    single = _dm(clean, val_batch_size=val_batch_size)
    single.setup()
    everything = torch.cat(list(single.val_dataloader()))
    assert len(everything) == 12 * 15  # every non-BOS val token, the last batch partial
    per_rank, lens = [], set()
    for rank in range(world):
        dm = _dm(clean, rank=rank, world=world, val_batch_size=val_batch_size)
        dm.setup()
        batches = list(dm.val_dataloader())
        lens.add((len(batches), len(dm.val_dataloader())))
        per_rank.append(torch.cat(batches))
    assert len(lens) == 1 and len({a for a, b in lens} | {b for a, b in lens}) == 1  # equal on every rank
    torch.testing.assert_close(torch.cat(per_rank), everything, rtol=0, atol=0)

    # The split-level NMSE from summed per-rank states equals one process's, and the definition.
    recon = lambda x: 0.7 * x + 0.01  # noqa: E731
    metrics = []
    for part in per_rank:
        m = NMSE(everything.shape[1])
        for chunk in part.split(val_batch_size):
            m.update(chunk, recon(chunk))
        metrics.append(m)
    merged = metrics[0]
    for m in metrics[1:]:
        for name in ("sse", "sum_x", "sum_sq", "count"):
            setattr(merged, name, getattr(merged, name) + getattr(m, name))
    x = everything.double()
    brute = ((x - recon(everything).double()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(merged.compute()) == pytest.approx(float(brute), rel=1e-6)


def test_nmse_metric_is_a_ratio_of_sums_over_uneven_batches():
    torch.manual_seed(0)
    x = torch.randn(1001, 6) * torch.arange(1, 7) + 3
    x_hat = x + 0.3 * torch.randn_like(x)
    m = NMSE(6)
    for chunk, chunk_hat in zip(x.split(137), x_hat.split(137)):  # the last batch partial
        m.update(chunk, chunk_hat)
    xd = x.double()
    brute = ((xd - x_hat.double()) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert float(m.compute()) == pytest.approx(float(brute), rel=1e-6)


@pytest.mark.slow
def test_two_process_ddp_validation_equals_one_process(clean, tmp_path):
    """Real DDP (2 CPU processes, gloo): a val batch that divides nothing, every rank the same
    number of steps, and the reduced split metrics equal to one process's."""
    import lightning as L

    from conftest import sae_module

    def validate(devices):
        L.seed_everything(0)
        model = sae_module(d_in=32, num_latents=64, k=4, dead_tokens=256)
        dm = _dm(clean, val_batch_size=7)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        return trainer.validate(model, dm, verbose=False)[0]

    one, two = validate(1), validate(2)
    for key in ("val/nmse", "val/l0", "val/dead_frac"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
