"""N2G: the trie against hand-matched positions, and a toy LM where each latent is a token
detector, so the explanation is that token and precision = recall = 1."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.n2g import WILDCARD, n2g_eval, trie_insert, trie_match
from sae_lit.model.sae import TopKSAE


def test_trie_matches_hand_positions():
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6], [0, 6, 6, 7, 1, 7]])
    trie = {}
    trie_insert(trie, [5, 6], 1.0)
    trie_insert(trie, [6, WILDCARD, 1], 2.0)
    hit = trie_match(trie, tokens)
    expected = torch.zeros_like(hit)
    expected[0, 2] = expected[0, 5] = True  # "5 6"
    expected[1, 4] = True  # "6 7 1" matches "6 * 1"
    assert torch.equal(hit, expected)
    assert trie["children"][6]["children"][5]["activations"] == [1.0]


class OneHotLM(nn.Module):
    """Hookpoint = one-hot token embedding (no mixing between positions)."""

    def __init__(self, V=8):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.embed = nn.Embedding(V, V)
        self.layers = nn.ModuleList([nn.Identity()])
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(V))

    def forward(self, input_ids, use_cache=False):
        h = self.layers[0](self.embed(input_ids))
        return SimpleNamespace(logits=h)


def test_token_detector_latents_get_perfect_precision_and_recall():
    V = 8
    model = OneHotLM(V)
    sae = TopKSAE(V, V, k=1, normalize="none", seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(V))
        sae.W_dec.copy_(torch.eye(V))
        sae.b_dec.zero_()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, V, (8, 12), generator=g)
    tokens[:, 0] = 0
    acts = hook_acts(model, "layers.0", tokens)
    r = n2g_eval(sae, model, "layers.0", tokens, acts, bos_id=0, mask_id=1, n_latents=4, top_examples=4)
    assert r.details["latents"] == 4
    assert r.metrics["eval/n2g_precision"] == pytest.approx(1.0)
    assert r.metrics["eval/n2g_recall"] == pytest.approx(1.0)
    for j, ex in r.details["explanations"].items():
        assert ex["patterns"] == [[j]]  # the token itself, no context needed


def test_n2g_runs_on_tiny_llama():
    model = build_tiny_model(vocab_size=64, n_layers=2, hidden=32, seed=0)
    sae = TopKSAE(32, 48, k=4, normalize="none", seed=0)
    tokens = torch.randint(2, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    acts = hook_acts(model, "resid_post.0", tokens)
    r = n2g_eval(sae, model, "resid_post.0", tokens, acts, bos_id=0, mask_id=1, n_latents=5, top_examples=4)
    assert r.details["latents"] == 5
    for name in ("eval/n2g_precision", "eval/n2g_recall"):
        assert 0.0 <= r.metrics[name] <= 1.0
