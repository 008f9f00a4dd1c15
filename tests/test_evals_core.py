"""Downstream loss, shrinkage and progressive recovery against hand computations on tiny
fixed inputs and a tiny random llama (built from a config, nothing downloaded)."""
import math

import pytest
import torch

from conftest import build_tiny_model
from sae_lit.evals.downstream import downstream_loss
from sae_lit.evals.progressive import jumprelu_threshold, jumprelu_thresholds, progressive_recovery
from sae_lit.evals.shrinkage import nnls, shrinkage
from sae_lit.model.sae import TopKSAE


class IdentitySAE:
    """encode = the activation itself as d 'latents'; decode gives it back."""

    def encode(self, x):
        return x, torch.arange(x.shape[1]).expand_as(x)

    def decode(self, values, indices):
        return values


class ZeroSAE(IdentitySAE):
    def decode(self, values, indices):
        return torch.zeros_like(values)


class ScaledSAE:
    """Wraps a TopKSAE and reports its values times `factor`: an SAE whose activations are
    shrunk (factor < 1) by a known amount."""

    def __init__(self, sae, factor):
        self.sae, self.factor = sae, factor
        self.W_dec, self.num_latents, self.k = sae.W_dec, sae.num_latents, sae.k

    def encode(self, x):
        v, i = self.sae.encode(x)
        return v * self.factor, i

    def decode(self, values, indices):
        return self.sae.decode(values, indices)


@pytest.fixture(scope="module")
def tiny_lm():
    return build_tiny_model(vocab_size=64, n_layers=2, hidden=32, seed=0)


@pytest.fixture(scope="module")
def contexts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (6, 12), generator=g)
    ids[:, 0] = 0  # BOS
    return ids


def test_identity_sae_gives_zero_delta_ce_and_kl(tiny_lm, contexts):
    r = downstream_loss(IdentitySAE(), tiny_lm, "resid_post.0", contexts, batch_size=4)
    assert r.metrics["eval/delta_ce"] == pytest.approx(0.0, abs=1e-6)
    assert r.metrics["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert r.metrics["eval/ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r.details["tokens"] == 6 * 10  # BOS prediction excluded, last position has no target
    assert r.details["exclude_bos"] is True


def test_zero_reconstruction_equals_zero_ablation(tiny_lm, contexts):
    r = downstream_loss(ZeroSAE(), tiny_lm, "resid_post.0", contexts, batch_size=4, exclude_bos=False)
    assert r.details["ce_sae"] == pytest.approx(r.details["ce_zero"], rel=1e-6)
    assert r.metrics["eval/ce_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert r.details["kl"] == pytest.approx(r.details["kl_zero"], rel=1e-5)
    assert r.details["tokens"] == 6 * 11


def test_downstream_ce_matches_a_hand_computation(tiny_lm, contexts):
    """CE of the clean model computed here directly from the logits."""
    with torch.no_grad():
        logits = tiny_lm(input_ids=contexts).logits.float()
    logp = logits[:, 1:-1].log_softmax(-1)
    ce = -logp.gather(-1, contexts[:, 2:, None]).mean()
    r = downstream_loss(IdentitySAE(), tiny_lm, "resid_post.0", contexts, batch_size=5)
    assert r.details["ce_clean"] == pytest.approx(ce.item(), rel=1e-5)


def test_random_topk_sae_sits_between_clean_and_zero(tiny_lm, contexts):
    sae = TopKSAE(32, 64, k=4, normalize="none", seed=0)
    r = downstream_loss(sae, tiny_lm, "resid_post.0", contexts)
    assert r.metrics["eval/kl"] > 0
    assert math.isfinite(r.metrics["eval/ce_recovered"])


# ------------------------------------------------------------------ shrinkage


def test_nnls_recovers_exact_nonnegative_solution():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 20, 5, generator=g)
    x_true = torch.rand(16, 5, generator=g)
    x_true[:, 0] = 0  # some coordinates on the bound
    x = nnls(A, (A @ x_true.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(x, x_true, atol=1e-5)


def test_nnls_clamps_at_zero():
    A = torch.eye(2).unsqueeze(0)
    x = nnls(A, torch.tensor([[-1.0, 2.0]]))
    assert torch.allclose(x, torch.tensor([[0.0, 2.0]]), atol=1e-6)


def _orthonormal_sae(d=16, k=3, normalize="none"):
    sae = TopKSAE(d, d, k=k, normalize=normalize, seed=0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        sae.W_dec.copy_(q)
        sae.W_enc.copy_(q)
        sae.b_dec.copy_(torch.randn(d, generator=torch.Generator().manual_seed(2)))
    return sae


def _exact_sparse_inputs(sae, n=64, k=3, seed=3):
    """Inputs that are exactly b_dec + k decoder rows with positive weights."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, sae.num_latents)
    for row in z:
        row[torch.randperm(sae.num_latents, generator=g)[:k]] = 1 + torch.rand(k, generator=g)
    return z @ sae.W_dec.detach() + sae.b_dec.detach(), z


def test_shrinkage_of_exact_topk_codes_is_one():
    sae = _orthonormal_sae()
    x, _ = _exact_sparse_inputs(sae)
    r = shrinkage(sae, x)
    assert r.metrics["eval/shrinkage"] == pytest.approx(1.0, abs=1e-5)
    assert r.details["nmse_after_refit"] < 1e-8


@pytest.mark.parametrize("normalize", ["none", "constant", "layer_norm"])
def test_shrinkage_undoes_a_known_shrink(normalize):
    """Values reported at half their size: the refit doubles them, whatever the normalisation."""
    sae = _orthonormal_sae(normalize=normalize)
    x, _ = _exact_sparse_inputs(sae)
    if normalize == "constant":
        sae.input_scale.fill_(0.5)
        x = x / 0.5
    if normalize == "layer_norm":
        x = x * 3.0 + 1.0  # raw activations; the SAE sees the layer-normed version
        sae.b_dec.data.zero_()
    r = shrinkage(ScaledWithNorm(sae, 0.5), x)
    assert r.metrics["eval/shrinkage"] == pytest.approx(2.0, rel=1e-3)


class ScaledWithNorm(ScaledSAE):
    """ScaledSAE that also exposes the normalisation, as TopKSAE does."""

    def normalize_input(self, x):
        return self.sae.normalize_input(x)

    def denormalize(self, x, stats):
        return self.sae.denormalize(x, stats)

    def parameters(self):
        return self.sae.parameters()


# ------------------------------------------------------------------ progressive recovery


def test_progressive_recovery_on_exact_k_sparse_data():
    sae = _orthonormal_sae(k=4)
    x, _ = _exact_sparse_inputs(sae, n=128, k=4)
    r = progressive_recovery(sae, x, x_train=x)
    topk = r.details["topk"]
    assert set(topk) == {"1", "2", "4", "8", "16"}
    assert topk["4"]["nmse"] < 1e-10 and topk["8"]["nmse"] < 1e-10
    assert topk["1"]["nmse"] > topk["2"]["nmse"] > 1e-3
    # Every input has exactly 4 positive coordinates: any threshold in [0, min value) gives L0 4.
    assert r.details["jumprelu"]["l0"] == pytest.approx(4.0)
    assert r.details["jumprelu"]["nmse"] < 1e-10
    # The threshold sweep: targets k/2 .. 4k by sqrt 2, thresholds falling as the target grows
    curve = r.details["jumprelu_curve"]
    assert [c["target_l0"] for c in curve] == pytest.approx([4 * 2 ** (e / 2) for e in range(-2, 5)])
    assert all(a["threshold"] >= b["threshold"] for a, b in zip(curve, curve[1:]))
    assert curve[0]["l0"] == pytest.approx(2.0) and curve[0]["nmse"] > 1e-3
    d = r.details["topk_4k_minus_k"]
    assert d["lo"] <= d["mean"] <= d["hi"] and d["mean"] == pytest.approx(topk["16"]["nmse"] - topk["4"]["nmse"])
    assert "eval/progressive_recovery" in r.figures


def test_jumprelu_thresholds_give_the_target_l0_by_brute_force():
    """On continuous random pre-activations every target L0 (x N tokens an integer) is met
    exactly on the calibration data, counted over the dense pre-activations."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(16, 64, k=4, normalize="none", seed=0)
    x = torch.randn(200, 16, generator=g)
    targets = [2.0, 4.0, 5.5, 16.0]
    thetas = jumprelu_thresholds(sae, x, targets, batch_size=64)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    for target, theta in zip(targets, thetas):
        assert (pre > theta).sum().item() == round(target * 200)


def test_jumprelu_threshold_hand_computed():
    """Pre-activations equal the inputs (identity weights); values 5,3,2,1,0.5 with target mean
    L0 2 over 2 tokens -> 4 must fire -> theta midway between 1 and 0.5."""
    sae = TopKSAE(4, 4, k=2, normalize="none")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_dec.zero_()
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0], [5.0, 0.5, 0.0, 0.0]])
    assert jumprelu_threshold(sae, x, target_l0=2) == pytest.approx(0.75)


def test_outlier_positions_keep_their_clean_activation(tiny_lm, contexts):
    """A threshold below every norm marks every position an outlier: nothing is spliced."""
    r = downstream_loss(ZeroSAE(), tiny_lm, "resid_post.0", contexts, outlier_threshold=0.0)
    assert r.details["ce_sae"] == pytest.approx(r.details["ce_clean"], rel=1e-6)
    assert r.details["outlier_positions_kept_clean"] == 6 * 11
