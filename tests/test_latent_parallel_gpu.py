"""Latent parallelism on CUDA (skipped without it; benchmarks/gpu_check.sh runs these).

One GPU: the sharded code path with one shard equals TopKSAE on the same GPU, in float64 and
under bf16 autocast. Two or more GPUs: two NCCL shards equal one process, as the gloo tests
check on CPU."""
import pytest
import torch
import torch.distributed as dist

from distributed import spawn
from sae_lit.model.sae import TopKSAE
from sae_lit.model.sharded import LatentComm, ShardedTopKSAE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pair(device, dtype=torch.float64, multi_topk=True):
    torch.manual_seed(0)
    sae = TopKSAE(48, 1024, 16, k_aux=64, multi_topk=multi_topk, seed=0).to(device, dtype)
    x = (torch.randn(512, 48) * 2 + 0.5).to(device, dtype)
    sae.init_from_data(x)
    dead = torch.zeros(1024, dtype=torch.bool, device=device)
    dead[::7] = True
    return sae, x, dead


def _grads(sae, x, dead, autocast=False):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = sae(x, dead_mask=dead, diagnose=True)
        loss = out.nmse + out.auxk_loss / 32 + out.multi_topk_nmse / 8
    loss.backward()
    return out, {n: p.grad.detach().cpu() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp64", "bf16-autocast"])
def test_one_shard_on_cuda_is_topk_sae(autocast):
    dtype = torch.float32 if autocast else torch.float64
    sae, x, dead = _pair("cuda", dtype)
    shard = ShardedTopKSAE.from_full(sae, LatentComm())
    out_a, g_a = _grads(sae, x, dead, autocast)
    out_b, g_b = _grads(shard, x, dead, autocast)
    assert torch.equal(out_a.indices, out_b.indices)
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-10, atol=1e-12)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], **tol)


def _nccl_worker(rank, world):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        sae, x, dead = _pair(f"cuda:{rank}")
        shard = ShardedTopKSAE.from_full(sae, LatentComm.of(dist.group.WORLD))
        out_a, g_a = _grads(sae, x, dead)
        out_b, g_b = _grads(shard, x, dead[shard.lo : shard.hi])
        assert torch.equal(out_a.indices, out_b.indices)
        for name in ("W_enc", "b_enc", "W_dec"):
            torch.testing.assert_close(g_b[name], g_a[name][shard.lo : shard.hi], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_b["b_dec"], g_a["b_dec"], rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_shards_match_one_process():
    spawn(_nccl_worker, 2, init_group=False)
