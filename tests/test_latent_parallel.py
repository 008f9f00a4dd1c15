"""Latent parallelism (sae_lit.model.sharded, sae_lit.training.strategies) against one process.

The model-level tests run the sharded SAE in gloo process groups on CPU, in float64, and
compare selections, losses, gradients and whole training runs with TopKSAE in one process.
The Lightning tests (slow) run SAEModule under LatentParallelStrategy: training, sharded
checkpoints and resume, and the streamed export.
"""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import spawn
from sae_lit.model.sae import SAEConfig, TopKSAE, init_rows
from sae_lit.model.sharded import LatentComm, ShardedTopKSAE, sharded_topk

D, N, K = 16, 96, 4


def _sae(dtype=torch.float64, **kw) -> tuple[TopKSAE, torch.Tensor]:
    torch.manual_seed(0)
    sae = TopKSAE(D, N, K, seed=0, **kw).to(dtype)
    x = (torch.randn(48, D, dtype=torch.float64) * 3 + 1).to(dtype)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
    return sae, x


def _dead(seed=1) -> torch.Tensor:
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:40]] = True
    return dead


def test_init_rows_are_slices_of_the_whole_init():
    for tied in (True, False):
        for n, d in ((96, 16), (130, 7), (5000, 48)):
            cfg = SAEConfig(d_in=d, num_latents=n, k=4, tied_init=tied, seed=3)
            whole = TopKSAE(cfg)
            cuts = [0, n // 3, n - 1, n]
            parts = [init_rows(cfg, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
            assert torch.equal(torch.cat([p[0] for p in parts]), whole.W_dec.detach())
            assert torch.equal(torch.cat([p[1] for p in parts]), whole.W_enc.detach())


def test_one_shard_is_the_unsharded_sae():
    """With a group of one (no collectives) the sharded code path is TopKSAE's."""
    sae, x = _sae(multi_topk=True, k_aux=8)
    one = ShardedTopKSAE.from_full(sae, LatentComm())
    a, b = sae(x, dead_mask=_dead(), diagnose=True), one(x, dead_mask=_dead(), diagnose=True)
    (a.nmse + a.auxk_loss + a.multi_topk_nmse).backward()
    (b.nmse + b.auxk_loss + b.multi_topk_nmse).backward()
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.dead_margin, a.dead_margin)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(getattr(one, name).grad, p.grad, rtol=1e-12, atol=1e-14)


def test_a_detached_shard_refuses_collectives():
    sae, x = _sae()
    shard = ShardedTopKSAE.from_full(sae, LatentComm(None, 1, 2))
    assert (shard.lo, shard.hi) == (N // 2, N)
    with pytest.raises(RuntimeError, match="detached"):
        shard.encode(x)


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="multiple of 5"):
        ShardedTopKSAE(SAEConfig(d_in=8, num_latents=96, k=4), LatentComm(None, 0, 5))


# --------------------------------------------------------------------------- one step
STEP_CASES = [  # (multi_topk, k_aux, auxk_bf16, dtype): dense and gathered AuxK, fp32 native kernels
    (False, 8, False, torch.float64), (True, 8, False, torch.float64), (False, 2, False, torch.float64),
    (True, 30, False, torch.float64), (False, 8, False, torch.float32), (False, 8, True, torch.float32),
]


def _one_step(sae, x, dead, diagnose=True):
    out = sae(x, dead_mask=dead, diagnose=diagnose)
    (out.nmse + out.auxk_loss / 32 + out.multi_topk_nmse / 8).backward()
    return out


def _step_worker(rank, world):
    comm = LatentComm.of(dist.group.WORLD)
    for multi, k_aux, bf16, dtype in STEP_CASES:
        sae, x = _sae(dtype, multi_topk=multi, k_aux=k_aux, auxk_bf16=bf16)
        shard = ShardedTopKSAE.from_full(sae, comm)
        ref = _one_step(sae, x, _dead())
        out = _one_step(shard, x, _dead()[shard.lo : shard.hi])
        tight = dtype == torch.float64
        # bf16 AuxK: the shards may take AuxK's dense path where one process gathers (or back)
        tol = dict(rtol=1e-11, atol=1e-13) if tight else dict(rtol=1e-2, atol=1e-4) if bf16 else dict(rtol=2e-4, atol=1e-5)
        case = f"multi={multi} k_aux={k_aux} bf16={bf16} {dtype}"
        assert torch.equal(out.indices, ref.indices), case
        torch.testing.assert_close(out.values, ref.values, **tol)
        for name in ("nmse", "auxk_loss", "multi_topk_nmse"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol, msg=lambda m: f"{case} {name}: {m}")
        assert float(ref.auxk_loss.detach()) > 0, case
        torch.testing.assert_close(out.dead_margin, ref.dead_margin, **tol)
        for name in ("W_enc", "b_enc", "W_dec"):
            torch.testing.assert_close(getattr(shard, name).grad, getattr(sae, name).grad[shard.lo : shard.hi], **tol,
                                       msg=lambda m: f"{case} {name}: {m}")
        torch.testing.assert_close(shard.b_dec.grad, sae.b_dec.grad, **tol, msg=lambda m: f"{case} b_dec: {m}")
        # Inference: the whole SAE's answer on every shard.
        v, i = sae.encode(x)
        v_s, i_s = shard.encode(x)
        assert torch.equal(i_s, i)
        torch.testing.assert_close(shard.reconstruct(x), sae.reconstruct(x), **tol)
        total = torch.nn.utils.clip_grad_norm_(sae.parameters(), 0.1)
        torch.testing.assert_close(shard.clip_grad_norm_(0.1).to(total.dtype), total, **tol)
        for name in ("W_enc", "W_dec"):
            torch.testing.assert_close(getattr(shard, name).grad, getattr(sae, name).grad[shard.lo : shard.hi], **tol)


def test_sharded_step_matches_one_process_in_every_case():
    """Two shards: the same top-k and AuxK selections, losses, dead margins and gradients as
    TopKSAE (float64: to rounding; float32 with the native CPU kernels and bf16 AuxK: the
    same selections, close values), and the global gradient norm."""
    spawn(_step_worker, 2)


def test_sharded_topk_is_exact_in_both_rounds_and_under_ties():
    """A small first round (capacity 0.5): tokens whose top k sits mostly on one shard need the
    second round; every token's answer is still the top k of the whole row. Ties at the k-th
    value across shards (the reference's "keep >= the k-th" would keep them all): exactly k
    entries, the same on every shard."""
    spawn(_topk_worker, 2)


def _topk_worker(rank, world):
    comm = LatentComm.of(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 200, generator=g, dtype=torch.float64)
    full[:20, :100] += 5.0  # the first 20 tokens' top k all on shard 0
    mine = full[:, rank * 100 : (rank + 1) * 100]
    for k, cols in ((16, None), (16, torch.arange(0, 100, 3)), (40, None)):
        v, i = sharded_topk(mine, k, comm, torch.arange(rank * 100, rank * 100 + 100), cols=cols, capacity=0.5)
        ref = full if cols is None else full[:, torch.cat([cols, cols + 100])]
        want_v, want_at = ref.topk(k, dim=1)
        want_i = want_at if cols is None else torch.cat([cols, cols + 100])[want_at]
        assert torch.equal(v, want_v)
        assert torch.equal(i.sort(1).values, want_i.sort(1).values)
    src = torch.zeros(3, 8, dtype=torch.float64)
    src[:, rank] = 1.0  # one 1.0 per shard, the rest ties at 0
    v, i = sharded_topk(src, 4, comm, torch.arange(rank * 8, rank * 8 + 8))
    assert v.shape == (3, 4) and (v[:, :2] == 1).all() and (v[:, 2:] == 0).all()
    gathered = comm.all_gather(i)
    assert torch.equal(gathered[0], gathered[1])
    assert all(len(set(row.tolist())) == 4 for row in i)


# --------------------------------------------------------------------------- whole runs
def _train(sae, batches_per_step, dead_tokens=64, steps=20, clip=0.05, replica_group=None, replicas=1):
    """SAEModule's step, written out: per-replica losses, counters with this batch's
    firings out of the dead set, gradients averaged over replicas, projection, clipping
    on the global norm, Adam, renormalisation. Returns each step's selections, the final
    tokens-since-fired counters and each step's AuxK loss."""
    sharded = isinstance(sae, ShardedTopKSAE)
    n_local = sae.num_local if sharded else sae.num_latents
    lo = sae.lo if sharded else 0
    since = torch.zeros(n_local, dtype=torch.int64)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, eps=6.25e-10)
    picks, auxk = [], []
    for step in range(steps):
        opt.zero_grad()
        tokens = sum(b.shape[0] for b in batches_per_step(step)) * replicas
        counts = torch.zeros(n_local)
        loss_scale = 1.0 / len(batches_per_step(step))
        for x in batches_per_step(step):
            out = sae(x, dead_mask=since + tokens >= dead_tokens)
            (loss_scale * (out.nmse + out.auxk_loss / 32)).backward()
            fired = out.indices[out.values > 0] - lo
            counts += torch.bincount(fired[(fired >= 0) & (fired < n_local)], minlength=n_local).float()
            picks.append(out.indices)
            auxk.append(float(out.auxk_loss.detach()))
        if replica_group is not None:
            dist.all_reduce(counts, group=replica_group)
            for p in sae.parameters():
                dist.all_reduce(p.grad, group=replica_group)
                p.grad /= replicas
        since += tokens
        since[counts > 0] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        if sharded:
            sae.clip_grad_norm_(clip)
        else:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return picks, since, auxk


def _batches(replica: int, replicas: int):
    def get(step):
        g = torch.Generator().manual_seed(1000 * step + replica)
        x = torch.randn(32, D, generator=g, dtype=torch.float64) * 3 + 1
        return [x]
    return get


def _all_replicas(replicas: int):
    def get(step):
        return [_batches(r, replicas)(step)[0] for r in range(replicas)]
    return get


def _mesh_worker(rank, world, replicas, out_dir):
    shards = world // replicas
    replica, shard = divmod(rank, shards)  # rank = replica * shards + shard, as the reference
    shard_groups = [dist.new_group([r * shards + s for s in range(shards)]) for r in range(replicas)]
    replica_groups = [dist.new_group([r * shards + s for r in range(replicas)]) for s in range(shards)]
    comm = LatentComm.of(shard_groups[replica])
    sae, _ = _sae(k_aux=8)
    with torch.no_grad():
        sae.b_enc[: N // 3] -= 6.0  # some latents start dead, so AuxK works from step 4 on
    mine = ShardedTopKSAE.from_full(sae, comm)
    picks, since, _ = _train(mine, _batches(replica, replicas), replica_group=replica_groups[shard] if replicas > 1 else None,
                          replicas=replicas)
    torch.save({"picks": picks, "since": since, "state": mine.state_dict(), "lo": mine.lo},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("replicas,shards", [(1, 2), pytest.param(2, 2, marks=pytest.mark.slow)], ids=["1x2", "2x2"])
def test_mesh_trains_like_one_process(replicas, shards, tmp_path):
    """20 Adam steps (clipped, AuxK active): every shard of every replica ends with its
    slice of the weights one process gets when it averages the replicas' gradients
    itself, after the same top-k selections at every step (float64)."""
    spawn(_mesh_worker, replicas * shards, replicas, str(tmp_path))
    sae, _ = _sae(k_aux=8)
    with torch.no_grad():
        sae.b_enc[: N // 3] -= 6.0
    picks, since, auxk = _train(sae, _all_replicas(replicas), replicas=1)
    for rank in range(replicas * shards):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        replica = rank // shards
        assert all(torch.equal(a, b) for a, b in zip(got["picks"], picks[replica::replicas])), rank
        lo = got["lo"]
        hi = lo + N // shards
        assert torch.equal(got["since"], since[lo:hi])
        whole = sae.state_dict()
        for name, value in got["state"].items():
            want = whole[name][lo:hi] if name in ("W_enc", "W_dec", "b_enc") else whole[name]
            torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"rank {rank} {name}: {m}")
    assert sum(a > 0 for a in auxk) > 10  # AuxK was at work
