"""Ablation sparsity against hand computations: a toy LM whose logits are a linear read-out of
the hookpoint, so an ablation's effect on the logits is known exactly."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from sae_lit.evals.ablation import ablation_sparsity, sparsity_of
from sae_lit.model.sae import TopKSAE

V, D, T = 10, 4, 6


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


def test_sparsity_formula_hand_values():
    one = torch.zeros(4, V)
    one[2, 5] = -3.0
    assert sparsity_of(one) == pytest.approx(1 / (4 * V))
    assert sparsity_of(torch.ones(4, V)) == pytest.approx(1.0)
    assert sparsity_of(torch.zeros(3, 3)) != sparsity_of(torch.zeros(3, 3))  # nan: nothing moved


def test_ablating_a_latent_that_moves_one_logit():
    """All latents decode onto channel 0 (positive weights), so each ablation moves logit 3 at
    the ablated token only: sparsity 1 / (V * (T - t)) for that pair."""
    model = ToyLM()
    sae = TopKSAE(D, 3, k=1, normalize="none", seed=0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:, 0] = 1.0
        sae.W_enc.copy_(sae.W_dec)
        sae.b_dec.zero_()
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))
    r = ablation_sparsity(sae, model, "layers.0", ids, pairs_per_context=10, baseline=True)
    # one pair per non-BOS token (k = 1)
    assert r.details["pairs"] == T - 1
    expected = sum(1 / (V * (T - t)) for t in range(1, T)) / (T - 1)
    assert r.metrics["eval/ablation_sparsity"] == pytest.approx(expected, rel=1e-5)
    # The channel baseline ablates at the same tokens and also moves one logit each.
    assert r.metrics["eval/ablation_sparsity_residual"] == pytest.approx(expected, rel=1e-5)


def test_tiny_llama_latents_sparser_than_nothing():
    model = build_tiny_model(vocab_size=64, n_layers=2, hidden=32, seed=0)
    sae = TopKSAE(32, 64, k=4, normalize="none", seed=0)
    ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    r = ablation_sparsity(sae, model, "resid_post.0", ids, pairs_per_context=3)
    assert r.details["pairs"] == 6
    assert 0 < r.metrics["eval/ablation_sparsity"] <= 1
    assert 0 < r.metrics["eval/ablation_sparsity_residual"] <= 1
