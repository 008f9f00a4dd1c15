"""The CUDA path of the training step against the CPU one (skipped without CUDA).

Run on a GPU machine with ``python -m pytest -m gpu`` (benchmarks/gpu_check.sh does, then
times the step)."""
import pytest
import torch

from sae_lit.model.sae import TopKSAE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, autocast: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = sae(x, dead_mask=dead)
        loss = out.nmse + out.auxk_loss / 32 + out.multi_topk_nmse / 8
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    return out, {n: p.grad.detach().cpu() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("sparse", ["chunked", "csr"])
@pytest.mark.parametrize("multi_topk,k_aux", [(False, 64), (True, 64), (False, 8)])
def test_cuda_step_matches_cpu(multi_topk, k_aux, sparse, monkeypatch, devices=("cpu", "cuda")):
    monkeypatch.setenv("SAE_LIT_CUDA_SPARSE", sparse)  # kernels.py: the two CUDA sparse paths
    # float64: GEMM rounding differs between devices; in float32 a near-tie at the top-k
    # (or top-k_aux) threshold could select a different latent on each.
    torch.manual_seed(0)
    x = (torch.randn(512, 48) * 2 + 0.5).double()
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[::7] = True
    results = []
    for device in devices:
        sae = TopKSAE(48, 1024, 16, k_aux=k_aux, multi_topk=multi_topk, seed=0).double().to(device)
        sae.init_from_data(x.to(device))
        results.append(_step(sae, x.to(device), dead.to(device), autocast=False))
    (out_c, g_c), (out_g, g_g) = results
    assert torch.equal(out_c.indices.sort(-1).values, out_g.indices.cpu().sort(-1).values)
    for name in ("nmse", "auxk_loss", "multi_topk_nmse"):
        torch.testing.assert_close(getattr(out_g, name).cpu(), getattr(out_c, name), rtol=1e-9, atol=1e-12)
    for name in g_c:
        torch.testing.assert_close(g_g[name], g_c[name], rtol=1e-7, atol=1e-10)


def test_cuda_bf16_autocast_step_is_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(2048, 64, device="cuda")
    dead = torch.zeros(2048, dtype=torch.bool, device="cuda")
    dead[::9] = True
    outs = []
    for autocast in (False, True):
        sae = TopKSAE(64, 2048, 32, seed=0).cuda()
        sae.init_from_data(x)
        outs.append(_step(sae, x, dead, autocast))
    (o32, g32), (o16, g16) = outs
    assert torch.isfinite(o16.nmse) and torch.isfinite(o16.auxk_loss)
    assert abs(o16.nmse.item() - o32.nmse.item()) < 0.02 * o32.nmse.item() + 1e-3
    for name in g32:  # same direction: bf16 GEMMs only perturb the selection and AuxK a little
        cos = torch.nn.functional.cosine_similarity(g16[name].flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.95, (name, cos)


def test_train_step_benchmark_runs_on_cuda():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "train_step.py"), "--device", "cuda", "--precision", "bf16-mixed",
         "--no-naive", "--reps", "2", "--shapes", "256,4096,32,8192"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "d=256 n=4096" in proc.stdout
