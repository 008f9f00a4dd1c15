"""Invariants of the TopK SAE that users rely on (PAPER.md, "Model" and "Training details")."""
import math

import pytest
import torch

from sae_lit.model.sae import TopKSAE, geometric_median


def _sae(d=16, n=64, k=4, **kw):
    torch.manual_seed(0)
    return TopKSAE(d, n, k, seed=0, **kw).double()


def _dense_reference(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None):
    """The paper's equations with plain dense autograd, AuxK as OpenAI's reference train.py
    computes it: the ground truth for the kernels.

    AuxK: the latents that fire in this batch leave the dead set first; the top k_aux of the
    remaining dead latents' pre-activations (encoder input x - b_pre, not detached), ReLU'd,
    decoded *with* b_pre against x - x_hat.detach() + b_pre.detach(), normalised by that
    target's total variance; no other scale."""
    x_n = x * sae.input_scale
    pre = (x_n - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    k_sel = 4 * sae.k if sae.multi_topk else sae.k
    v, i = pre.topk(k_sel, dim=-1)
    z_all = torch.zeros_like(pre).scatter(1, i, v.relu())
    z_k = torch.zeros_like(pre).scatter(1, i[:, : sae.k], v[:, : sae.k].relu())
    var = (x_n - x_n.mean(0)).pow(2).sum()
    recon = z_k @ sae.W_dec + sae.b_dec
    nmse = (recon - x_n).pow(2).sum() / var
    multi = ((z_all @ sae.W_dec + sae.b_dec - x_n).pow(2).sum() / var) if sae.multi_topk else nmse * 0
    aux = nmse * 0
    if dead is not None:
        fired = (z_k > 0).any(0)
        dead = dead & ~fired
    if dead is not None and dead.any():
        target = (x_n - recon).detach() + sae.b_dec.detach()
        pre_aux = (x_n.detach() - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
        pre_aux = pre_aux.masked_fill(~dead, -math.inf)
        n_dead = int(dead.sum())
        av, ai = pre_aux.topk(min(sae.k_aux, n_dead), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(1, ai, av.relu())
        e_hat = z_aux @ sae.W_dec + sae.b_dec
        aux = (target - e_hat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
    return recon / sae.input_scale, nmse, aux, multi


@pytest.mark.parametrize("input_grad", [False, True], ids=["fused", "composable"])
@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("n_dead,k_aux", [(0, 8), (5, 8), (40, 8), (40, 4)])
def test_sparse_training_forward_matches_dense_reference(multi_topk, n_dead, k_aux, input_grad):
    sae = _sae(k_aux=k_aux, multi_topk=multi_topk)
    x = torch.randn(32, 16, dtype=torch.float64) * 3 + 1
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    # AuxK builds a dense [B, n_dead] block while k_aux * 8 >= n_dead (5 or 40 dead at
    # k_aux = 8) and gathers beyond (40 dead at k_aux = 4).
    out = sae(x.clone().requires_grad_(input_grad), dead_mask=dead)
    loss = out.nmse + out.auxk_loss + out.multi_topk_nmse
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    recon, nmse, aux, multi = _dense_reference(sae, x, dead)
    ref_grads = torch.autograd.grad(nmse + aux + multi, list(sae.parameters()))
    torch.testing.assert_close(out.reconstruction, recon)
    torch.testing.assert_close(out.nmse, nmse)
    torch.testing.assert_close(out.auxk_loss, aux)
    torch.testing.assert_close(out.multi_topk_nmse, multi)
    for g, r, name in zip(grads, ref_grads, ["W_dec", "W_enc", "b_enc", "b_dec"]):
        torch.testing.assert_close(g, r, msg=lambda m: f"{name}: {m}")


def test_l0_equals_k_and_indices_distinct():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # all pre-activations positive: the ReLU keeps all k
    v, i = sae.encode(torch.randn(50, 16, dtype=torch.float64))
    assert v.shape == i.shape == (50, 4)
    assert ((v > 0).sum(-1) == 4).all()
    assert all(len(set(row.tolist())) == 4 for row in i)


def test_values_are_the_k_largest_pre_activations_relud():
    sae = _sae()
    x = torch.randn(20, 16, dtype=torch.float64)
    pre = sae.pre_acts(x * sae.input_scale)
    v, i = sae.encode(x)
    top = pre.topk(4, dim=-1).values
    torch.testing.assert_close(v.sort(-1).values, top.relu().sort(-1).values)


def test_tied_init_and_unit_norm_decoder():
    sae = _sae()
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))
    untied = TopKSAE(16, 64, 4, tied_init=False, seed=0)
    assert not torch.allclose(untied.W_enc, untied.W_dec)


def test_projected_gradient_is_orthogonal_to_decoder_rows():
    sae = _sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_gradient_parallel_to_decoder_directions()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-10


def test_unit_norm_after_an_optimizer_step():
    sae = _sae()
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_data(x)
    out = sae(x)
    out.nmse.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64, dtype=torch.float64))


def test_auxk_zero_without_dead_and_positive_with_dead_only_into_dead_rows():
    sae = _sae(k_aux=8)
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_data(x)
    none = sae(x, dead_mask=torch.zeros(64, dtype=torch.bool))
    assert none.auxk_loss.item() == 0.0 and torch.isfinite(none.auxk_loss)
    with torch.no_grad():  # latents 0-9 win every top-k; the others stay silent but positive
        sae.b_enc[:10] = 20.0
        sae.b_enc[10:] = 2.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[10:20] = True
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss.item() > 0
    sae.zero_grad()
    out.auxk_loss.backward()
    for p in (sae.W_enc, sae.W_dec):
        assert p.grad[~dead].abs().max() == 0, "AuxK gradient leaked into live latents"
        assert p.grad[dead].abs().max() > 0
    assert sae.b_dec.grad.abs().max() > 0, "AuxK trains b_pre too, as in the reference code"


def test_auxk_never_nan_on_constant_batch():
    sae = _sae(k_aux=8)
    x = torch.ones(8, 16, dtype=torch.float64)
    sae.init_from_data(torch.randn(32, 16, dtype=torch.float64))
    out = sae(x, dead_mask=torch.ones(64, dtype=torch.bool))
    assert torch.isfinite(out.auxk_loss)


def test_auxk_has_no_extra_scale_when_few_dead():
    """The reference code has no min(n_dead / k_aux, 1) factor (that is sparsify's)."""
    sae = _sae(k_aux=8)
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc[:2] = 5.0  # two dead latents that would fire if they were live
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:2] = True
    # 2 dead < k_aux: the unscaled loss, and the latents must not fire in this batch
    out = sae(x, dead_mask=dead)
    _, _, aux, _ = _dense_reference(sae, x, dead)
    torch.testing.assert_close(out.auxk_loss, aux)


@pytest.mark.parametrize("input_grad", [False, True], ids=["fused", "composable"])
def test_a_latent_that_fires_in_the_batch_gets_no_auxk_gradient(input_grad):
    sae = _sae(k_aux=8)
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_data(x)
    with torch.no_grad():  # latents 0-9 win every top-k; the others stay silent but positive
        sae.b_enc[:10] = 20.0
        sae.b_enc[10:] = 2.0
    firing, never = 3, [20, 21, 22]
    dead = torch.zeros(64, dtype=torch.bool)
    dead[firing] = True
    dead[never] = True
    out = sae(x.clone().requires_grad_(input_grad), dead_mask=dead)
    sae.zero_grad()
    out.auxk_loss.backward()
    for p in (sae.W_enc, sae.W_dec, sae.b_enc):
        assert p.grad[firing].abs().max() == 0, "a latent firing in this batch got AuxK's gradient"
        assert p.grad[never].abs().max() > 0


def test_b_pre_auxk_gradient_equals_the_reference_equations():
    """b_pre's gradient from AuxK alone, against dense autograd of the reference's equations
    (decode with b_pre against x - x_hat.detach() + b_pre.detach(); encoder input x - b_pre)."""
    sae = _sae(k_aux=8)
    x = torch.randn(48, 16, dtype=torch.float64) * 2 + 0.5
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(3))[:30]] = True
    for input_grad in (False, True):
        out = sae(x.clone().requires_grad_(input_grad), dead_mask=dead)
        (g,) = torch.autograd.grad(out.auxk_loss, [sae.b_dec])
        _, _, aux, _ = _dense_reference(sae, x, dead)
        (ref,) = torch.autograd.grad(aux, [sae.b_dec])
        assert ref.abs().max() > 0
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("input_grad", [False, True], ids=["fused", "composable"])
def test_non_finite_auxk_decoding_leaves_every_gradient_finite(input_grad):
    sae = _sae(k_aux=8)
    x = torch.randn(32, 16, dtype=torch.float64)
    sae.init_from_data(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    with torch.no_grad():
        # the dead latents decode to inf (their rows overflow); the main code never uses them
        sae.b_enc[40:] = 1.0
        sae.W_dec[40:] = 1e308
        sae.b_enc[:40] = 50.0  # the live ones win every top-k
    out = sae(x.clone().requires_grad_(input_grad), dead_mask=dead)
    loss = out.nmse + out.auxk_loss / 32
    assert out.auxk_loss.item() == 0.0
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    for g, name in zip(grads, ["W_dec", "W_enc", "b_enc", "b_dec"]):
        assert torch.isfinite(g).all(), name


def test_multi_topk_uses_4k_latents():
    sae = _sae(multi_topk=True)
    x = torch.randn(64, 16, dtype=torch.float64)
    sae.init_from_data(x)
    out = sae(x)
    assert out.values.shape[1] == 4  # the reported code is the k-sparse one
    x_n = x * sae.input_scale
    recon_16 = sae.reconstruct(x, k=16) * sae.input_scale
    expect = (x_n - recon_16).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.multi_topk_nmse, expect)


def test_geometric_median_against_brute_force():
    g = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.randn(30, 2, generator=g), torch.randn(5, 2, generator=g) * 20 + 50])
    med = geometric_median(pts.double())

    def cost(p):
        return (pts.double() - p).norm(dim=1).sum()

    grid = torch.stack(torch.meshgrid(torch.linspace(-3, 3, 301), torch.linspace(-3, 3, 301), indexing="ij"), -1)
    costs = (pts.double()[None] - grid.reshape(-1, 1, 2).double()).norm(dim=-1).sum(-1)
    best = grid.reshape(-1, 2)[costs.argmin()].double()
    assert cost(med) <= costs.min() + 1e-6
    assert (med - best).norm() < 0.05
    # far from the outlier-dragged mean
    assert (med - pts.double().mean(0)).norm() > 5


def test_init_from_data_sets_scale_and_median():
    sae = TopKSAE(16, 64, 4, seed=0)
    x = torch.randn(500, 16) * 7 + 3
    sae.init_from_data(x)
    x_n = x * sae.input_scale
    assert abs(x_n.pow(2).sum(1).mean().item() - 16) < 1e-3
    torch.testing.assert_close(sae.b_dec, geometric_median(x_n), rtol=1e-4, atol=1e-4)
    assert bool(sae.initialized)


def test_layer_norm_mode_round_trips_raw_space():
    sae = TopKSAE(16, 64, 16, normalize="layer_norm", seed=0)
    x = torch.randn(10, 16) * 5 + 2
    sae.init_from_data(x)
    out = sae(x)
    # openai/sparse_autoencoder's LN: unbiased std, eps added to the std (not under the root)
    mu, std = x.mean(-1, keepdim=True), x.var(-1, unbiased=True, keepdim=True).sqrt()
    x_n = (x - mu) / (std + 1e-5)
    v, i = (((x_n - sae.b_dec) @ sae.W_enc.t()) + sae.b_enc).topk(16, dim=-1)
    manual = (torch.zeros(10, 64).scatter(1, i, v.relu()) @ sae.W_dec + sae.b_dec) * std + mu
    torch.testing.assert_close(out.reconstruction, manual, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.reconstruct(x), manual, atol=1e-4, rtol=1e-4)


def test_relu_baseline_trains_dense_with_l1():
    sae = TopKSAE(16, 64, 1, activation="relu", seed=0)
    x = torch.randn(32, 16)
    sae.init_from_data(x)
    out = sae(x)
    assert out.l1_loss > 0 and out.values.shape == (32, 64)
    (out.nmse + 0.1 * out.l1_loss).backward()
    assert sae.W_enc.grad is not None


def test_auxk_bf16_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    ref, fast = TopKSAE(16, 64, 4, k_aux=8, seed=0), TopKSAE(16, 64, 4, k_aux=8, seed=0, auxk_bf16=True)
    for s in (ref, fast):
        s.init_from_data(x)
    a, b = ref(x, dead), fast(x, dead)
    torch.testing.assert_close(b.auxk_loss, a.auxk_loss, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(b.nmse, a.nmse)  # main loss untouched
    ga = torch.autograd.grad(a.nmse + a.auxk_loss, ref.W_enc)[0]
    gb = torch.autograd.grad(b.nmse + b.auxk_loss, fast.W_enc)[0]
    torch.testing.assert_close(gb, ga, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("multi_topk", [False, True])
def test_bf16_autocast_step_matches_fp32(multi_topk):
    """The bf16-mixed path (GEMM in bf16, sparse part and weights in fp32), exercised on CPU."""
    torch.manual_seed(0)
    x = torch.randn(128, 32) * 3
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:40] = True
    sae = TopKSAE(32, 256, 8, k_aux=16, multi_topk=multi_topk, seed=0)
    sae.init_from_data(x)
    ref = sae(x, dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead)
    loss = out.nmse + out.auxk_loss + out.multi_topk_nmse
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in sae.parameters())
    torch.testing.assert_close(out.nmse, ref.nmse, rtol=0.05, atol=0.01)


def test_release_buffers_frees_the_step_buffer_and_training_goes_on():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    sae = TopKSAE(16, 128, 4, seed=0)
    sae.init_from_data(x)
    first = sae(x).nmse
    sae.release_buffers()
    assert "_pre_buffer" not in sae.__dict__
    torch.testing.assert_close(sae(x).nmse, first)


def test_dead_margin_is_the_best_dead_pre_activation_minus_the_kth_value():
    sae = _sae(k_aux=8)
    x = torch.randn(40, 16, dtype=torch.float64)
    sae.init_from_data(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[30:50] = True
    out = sae(x, dead_mask=dead, diagnose=True)
    pre = sae.pre_acts(x * sae.input_scale)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[out.indices[out.values > 0]] = True
    still = dead & ~fired
    expect = pre[:, still].max(1).values - pre.topk(4, dim=-1).values[:, -1]
    torch.testing.assert_close(out.dead_margin.double(), expect)
    assert (out.dead_margin <= 1e-6).all()
    assert sae(x, dead_mask=dead).dead_margin is None
