"""Ablation sparsity against the paper's formula computed by brute force (one plain forward per
ablation, numpy's median), a toy LM whose effect is known exactly, and the window, the
float32 rule and the KV-cache path."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from sae_lit.evals.ablation import ablation_sparsity, sparsity_of
from sae_lit.model.sae import TopKSAE

V, D = 10, 4


class ToyLM(nn.Module):
    """Embedding -> one identity block (the hookpoint) -> linear head. The head reads every
    channel into logit 3 only, so any edit of the hookpoint at a token moves exactly one logit
    there (and none at other positions: no attention)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([nn.Identity()])
        self.head = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            self.embed.weight.uniform_(1.0, 2.0)  # every channel nonzero at every token
            self.head.weight.zero_()
            self.head.weight[3] = 1.0

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.head(self.layers[0](self.embed(input_ids))))


def brute_sparsity(delta: np.ndarray) -> float:
    """The paper's recipe, spelled out: per-position median removed, (L1/L2)^2 / (V T)."""
    d = delta - np.median(delta, axis=1, keepdims=True)
    return float((np.abs(d).sum() / np.sqrt((d * d).sum())) ** 2 / d.size)


def test_sparsity_formula_hand_values():
    one = torch.zeros(16, V)
    one[2, 5] = -3.0
    assert sparsity_of(one) == pytest.approx(1 / (16 * V))  # the median of each row is 0
    shift = torch.ones(16, V) * torch.arange(16.0)[:, None]
    assert math.isnan(sparsity_of(shift))  # a constant shift per position: no effect on the softmax
    assert sparsity_of(shift, center=None) == pytest.approx((shift.sum() / shift.norm()) ** 2 / shift.numel())
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 4096, generator=g)
    assert sparsity_of(dense) == pytest.approx(2 / math.pi, abs=0.01)  # the paper's dense reference
    even = torch.randn(3, 8, generator=g) + torch.tensor([0, 0, 0, 0, 5, 5, 5, 5.0])  # median between two values
    assert sparsity_of(even) == pytest.approx(brute_sparsity(even.numpy().astype(np.float64)), rel=1e-12)


def test_ablating_a_latent_that_moves_one_logit():
    """All latents decode onto channel 0 (positive weights), so each ablation moves logit 3 at
    the ablated token only: 1/(V T) for every pair, SAE and channels alike."""
    model = ToyLM()
    sae = TopKSAE(D, 3, k=1, normalize="none", seed=0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:, 0] = 1.0
        sae.W_enc.copy_(sae.W_dec)
        sae.b_dec.zero_()
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    r = ablation_sparsity(sae, model, "layers.0", ids, positions_per_context=10, latents_per_position=1, window=16)
    assert r.details["pairs"] == 2 * 4  # t in 1..4: t + 16 <= 20, BOS excluded
    assert r.metrics["eval/ablation_sparsity"] == pytest.approx(1 / (V * 16), rel=1e-6)
    assert r.metrics["eval/ablation_sparsity_residual"] == pytest.approx(1 / (V * 16), rel=1e-6)
    assert r.details["kv_cache"] is False  # a model without a cache takes the full-prefix path


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_model(vocab_size=64, n_layers=2, hidden=32, seed=0)
    sae = TopKSAE(32, 64, k=4, normalize="constant", seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)  # residuals of order 1, as in a trained model
        sae.input_scale.fill_(0.7)
        sae.b_dec.normal_(0, 0.1)
    ids = torch.randint(2, 64, (3, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return model, sae, ids


@torch.no_grad()
def test_every_pair_matches_a_brute_force_forward(tiny):
    """Each recorded pair recomputed from scratch: the hookpoint from output_hidden_states, the
    latent's value from an explicit encoder and top-k, its raw-space contribution z·W_dec/scale
    subtracted in a separate full forward, 16 positions of logits, numpy's median."""
    model, sae, ids = tiny
    r = ablation_sparsity(sae, model, "resid_post.0", ids, positions_per_context=3, latents_per_position=2, seed=1)
    assert r.details["pairs"] == 3 * 3 * 2
    s = sae.input_scale.item()
    model = copy.deepcopy(model).double()  # the reference in float64
    sae = copy.deepcopy(sae).double()
    for p in r.details["sample"]:
        x = ids[p["context"]][None]
        t, j = p["position"], p["latent"]
        assert 1 <= t and t + 16 <= ids.shape[1]
        clean = model(input_ids=x).logits[0].double().numpy()
        h = model(input_ids=x, output_hidden_states=True).hidden_states[1][0]  # after block 0
        pre = (h[t] * s - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
        top = pre.topk(sae.k)
        z = top.values[(top.indices == j).nonzero()[0, 0]].relu()
        assert z > 0

        def edited(delta):
            def hook(_m, _i, out):
                out = out[0] if isinstance(out, tuple) else out
                out = out.clone()
                out[0, t] -= delta
                return out

            handle = model.model.layers[0].register_forward_hook(hook)
            try:
                return model(input_ids=x).logits[0].double().numpy()
            finally:
                handle.remove()

        ablated = edited(z * sae.W_dec[j] / s)
        delta = (ablated - clean)[t : t + 16]
        assert brute_sparsity(delta) == pytest.approx(p["sae"], rel=1e-4)
        assert np.mean([brute_sparsity(row[None]) for row in delta]) == pytest.approx(p["sae_per_position"], rel=1e-4)
        delta = torch.zeros(32, dtype=torch.float64)
        delta[p["channel_index"]] = h[t, p["channel_index"]]
        ablated = edited(delta)
        assert brute_sparsity((ablated - clean)[t : t + 16]) == pytest.approx(p["channel"], rel=1e-4)
    vals = [p["sae"] for p in r.details["sample"]]
    assert r.metrics["eval/ablation_sparsity"] == pytest.approx(np.mean(vals))
    assert r.metrics["eval/ablation_sparsity_ci_lo"] <= r.metrics["eval/ablation_sparsity"] <= r.metrics["eval/ablation_sparsity_ci_hi"]
    lo, hi = r.metrics["eval/ablation_sparsity_diff_ci_lo"], r.metrics["eval/ablation_sparsity_diff_ci_hi"]
    assert lo <= r.metrics["eval/ablation_sparsity_diff"] <= hi


def test_cache_path_equals_full_prefix_path_and_has_no_noise_floor(tiny):
    model, sae, ids = tiny
    a = ablation_sparsity(sae, model, "resid_post.0", ids, positions_per_context=3, latents_per_position=2)
    b = ablation_sparsity(sae, model, "resid_post.0", ids, positions_per_context=3, latents_per_position=2, use_cache=False)
    assert a.details["kv_cache"] is True and b.details["kv_cache"] is False
    assert a.details["lm_tokens"] < b.details["lm_tokens"]
    for key in ("eval/ablation_sparsity", "eval/ablation_sparsity_residual"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5)
    assert a.details["noise_floor"] < 1e-5 and b.details["noise_floor"] < 1e-5


def test_bf16_subject_runs_in_float32(tiny):
    model, sae, ids = tiny
    half = build_tiny_model(vocab_size=64, n_layers=2, hidden=32, seed=0).to(torch.bfloat16)
    r = ablation_sparsity(sae, half, "resid_post.0", ids, positions_per_context=2, latents_per_position=2)
    ref = ablation_sparsity(sae, copy.deepcopy(half).float(), "resid_post.0", ids, positions_per_context=2,
                            latents_per_position=2)
    assert r.details["model_dtype"] == "torch.float32"
    assert r.metrics["eval/ablation_sparsity"] == pytest.approx(ref.metrics["eval/ablation_sparsity"], rel=1e-6)
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is left alone


def test_contexts_too_short_for_the_window_are_refused(tiny):
    model, sae, ids = tiny
    with pytest.raises(ValueError, match="t \\+ 16"):
        ablation_sparsity(sae, model, "resid_post.0", ids[:, :16])
