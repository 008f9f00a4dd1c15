"""Probe loss: the vectorised 1-D logistic regression against scipy, event -> token mapping,
the built-in task suite, and a user JSONL task one latent solves, on the tiny llama."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import build_tiny_tokenizer
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.probe_tasks import TASKS, Snippet, builtin_snippets, load_jsonl_task
from sae_lit.evals.probes import _event_positions, best_feature, build_examples, fit_1d_logistic, probe_eval, probe_scores
from sae_lit.model.sae import TopKSAE


def test_fit_matches_scipy_on_each_column():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) < 0.4).float()
    x = torch.randn(200, 3, generator=g) + y[:, None] * torch.tensor([0.5, 1.5, 0.0])
    w, b, mu, sd = fit_1d_logistic(x, y, l2=1e-3)
    for j in range(3):
        xs = ((x[:, j] - x[:, j].mean()) / x[:, j].std(unbiased=False)).double().numpy()
        yn = y.double().numpy()

        def f(p):
            z = p[0] * xs + p[1]
            return np.mean(np.logaddexp(0, z) - yn * z) + 0.5e-3 * p[0] ** 2

        ref = scipy_opt.minimize(f, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
        assert w[j].item() == pytest.approx(ref[0], abs=1e-4)
        assert b[j].item() == pytest.approx(ref[1], abs=1e-4)


def test_separating_feature_gives_near_zero_loss_others_chance():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0.0, 1.0] * 50)
    x = torch.randn(100, 5, generator=g)
    x[:, 3] = y * 2.0  # latent 3 fires exactly on the positives
    x[:, 4] = 0.0  # a dead latent
    tr, te = probe_scores(x, y, x, y)
    assert te[3] < 0.05
    assert te[4] == pytest.approx(math.log(2), abs=1e-4)
    r = best_feature(x, y, x, y)
    assert r["feature"] == 3 and r["test_ce"] < 0.05


def test_event_maps_to_last_overlapping_token():
    offsets = np.array([[0, 3], [3, 4], [4, 9], [9, 10]])
    # an event on chars 2..5 overlaps tokens 0, 1, 2: the probe reads token 2
    assert _event_positions(offsets, [(2, 5, 1)]) == [(2, 1)]
    # two events with different labels on one token: dropped
    assert _event_positions(offsets, [(4, 6, 1), (7, 9, 0)]) == []
    assert _event_positions(offsets, [(9, 10, 0)]) == [(3, 0)]


def test_builtin_suite_has_at_least_30_tasks_with_examples():
    tok = build_tiny_tokenizer(["def f(x):\n    return x  # the of and"] * 20)
    snippets = builtin_snippets(tok, n_code=24, n_pydoc=12, n_kjv_per_genre=6, max_tokens=48)
    _, tasks, skipped = build_examples(snippets, tok, max_per_class=32, min_per_class=4)
    vader = {"vader_positive", "vader_negative", "vader_polarity"}
    assert len(TASKS) >= 33
    assert len(tasks) + len(skipped) >= 30
    assert len(tasks) >= 25, skipped
    for split in tasks.values():
        assert {s for s, _, _ in split["train"]}.isdisjoint({s for s, _, _ in split["test"]})
        labels = [lab for *_, lab in split["train"]]
        assert labels.count(1) == labels.count(0)
    # Python categories come from tokenize: the keyword task's positives really are keywords.
    code = [s for s in snippets if s.source == "code"][0]
    for a, b, lab in code.events["py_keyword"]:
        if lab:
            assert __import__("keyword").iskeyword(code.text[a:b])


def test_jsonl_task_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "abc", "label": 2}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1: label must be 0 or 1"):
        load_jsonl_task(p)


@pytest.fixture(scope="module")
def tiny_subject(tiny_model_dir):
    from sae_lit.data.subject import load_model, load_tokenizer

    return load_model(tiny_model_dir, "cpu"), load_tokenizer(tiny_model_dir)


def test_task_solved_by_one_latent_gives_near_zero_probe_loss(tmp_path, tiny_subject):
    model, tok = tiny_subject
    words = "the of and to in is was that for it with as his on be at by he this had".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        label = i % 2
        prefix = " ".join(rng.choice(words, 6))
        rows.append({"text": f"{prefix} {'return' if label else 'yield'}", "label": label})
    path = tmp_path / "last_word.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    name, snippets = load_jsonl_task(path)

    # An SAE whose latent 0 reads the direction that separates the two classes.
    ids, tasks, _ = build_examples(snippets, tok, max_per_class=64, min_per_class=4)
    acts = torch.stack([hook_acts(model, "resid_post.1", torch.tensor([ids[s]]))[0, p] for s, p, _ in tasks[name]["train"]])
    y = torch.tensor([lab for *_, lab in tasks[name]["train"]], dtype=torch.bool)
    w = acts[y].mean(0) - acts[~y].mean(0)
    w = w / w.norm()
    mid = ((acts[y] @ w).min() + (acts[~y] @ w).max()) / 2
    sae = TopKSAE(acts.shape[1], 16, k=1, normalize="none", seed=0)
    with torch.no_grad():
        sae.W_enc.mul_(1e-3)
        sae.W_enc[0] = 100 * w
        sae.b_enc[0] = -100 * mid
        sae.b_dec.zero_()
    r = probe_eval(sae, model, tok, "resid_post.1", snippets, max_per_class=64)
    res = r.details["tasks"][name]
    assert res["sae"]["feature"] == 0
    assert r.metrics["eval/probe_loss"] < 0.05
    assert "eval/probe_loss_residual" in r.metrics
    assert "eval/probe_tasks" in r.figures
