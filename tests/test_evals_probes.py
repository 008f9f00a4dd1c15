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
from sae_lit.evals.probes import (L2, _event_positions, best_feature, build_examples, fit_1d_logistic, probe_eval,
                                  probe_features, probe_scores)
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
    assert r["column"] == 3 and r["test_ce"] < 0.05 and r["train_ce"] == pytest.approx(float(tr[3]), abs=1e-6)
    assert r["train_examples"].mean().item() == pytest.approx(r["train_ce"], abs=1e-6)


def _scipy_ce(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, l2: float = L2):
    """One 1-D probe by a general-purpose optimiser: (training CE, held-out CE), same objective
    (standardised feature, L2 on its weight)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    mu, sd = x.mean(), x.std()
    sd = sd if sd > 1e-12 else 1.0
    xs, xt = (x - mu) / sd, (x_test - mu) / sd

    def ce(p, a, b):
        z = p[0] * a + p[1]
        return np.mean(np.logaddexp(0, z) - b * z)

    p = scipy_opt.minimize(lambda p: ce(p, xs, y) + 0.5 * l2 * p[0] ** 2, [0.0, 0.0], method="BFGS",
                           options={"gtol": 1e-10}).x
    return ce(p, xs, y), ce(p, xt, y_test)


def test_two_stage_search_finds_the_exhaustive_best():
    """The float32 ranking + shortlist finds the same best feature and CE as fitting every one."""
    g = torch.Generator().manual_seed(2)
    y_tr, y_te = (torch.rand(300, generator=g) < 0.5).float(), (torch.rand(300, generator=g) < 0.5).float()
    X = torch.randn(600, 400, generator=g)
    X[:300] += y_tr[:, None] * torch.linspace(0, 1.2, 400)
    X[300:] += y_te[:, None] * torch.linspace(0, 1.2, 400)
    tasks = {"t": (torch.arange(300), y_tr, torch.arange(300, 600), y_te)}
    fast = probe_features(lambda cols, rows: X[rows][:, cols], 400, tasks, chunk=128, shortlist=16)["t"]
    full = best_feature(X[:300], y_tr, X[300:], y_te)
    assert fast["feature"] == full["column"]
    assert fast["train_ce"] == pytest.approx(full["train_ce"], abs=1e-9)


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


def _last_word_task(tmp_path, n=80):
    words = "the of and to in is was that for it with as his on be at by he this had".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        prefix = " ".join(rng.choice(words, 6))
        rows.append({"text": f"{prefix} {'return' if label else 'yield'}", "label": label})
    path = tmp_path / "last_word.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return load_jsonl_task(path)


def test_task_solved_by_one_latent_gives_near_zero_probe_loss(tmp_path, tiny_subject):
    model, tok = tiny_subject
    name, snippets = _last_word_task(tmp_path)
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
    assert r.metrics["eval/probe_loss"] < 0.05 and r.metrics["eval/probe_loss_heldout"] < 0.05
    for key in ("eval/probe_loss_gap", "eval/probe_loss_heldout_gap"):
        assert r.metrics[f"{key}_ci_lo"] <= r.metrics[key] <= r.metrics[f"{key}_ci_hi"]
    assert "eval/probe_tasks" in r.figures


def test_probe_reads_pre_activations_not_topk_values(tmp_path, tiny_subject):
    """Latent 0 separates the classes but never wins the top-1 (latent 1 always does): its
    post-TopK value is 0 everywhere, its pre-activation solves the task."""
    model, tok = tiny_subject
    name, snippets = _last_word_task(tmp_path)
    ids, tasks, _ = build_examples(snippets, tok, max_per_class=64, min_per_class=4)
    acts = torch.stack([hook_acts(model, "resid_post.1", torch.tensor([ids[s]]))[0, p] for s, p, _ in tasks[name]["train"]])
    y = torch.tensor([lab for *_, lab in tasks[name]["train"]], dtype=torch.bool)
    w = acts[y].mean(0) - acts[~y].mean(0)
    sae = TopKSAE(acts.shape[1], 4, k=1, normalize="none", seed=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[0] = 10 * w / w.norm()
        sae.b_enc[1] = 1e6
    _, idx = sae.encode(acts)
    assert (idx == 1).all()
    r = probe_eval(sae, model, tok, "resid_post.1", snippets, max_per_class=64)
    assert r.details["tasks"][name]["sae"]["feature"] == 0
    assert r.metrics["eval/probe_loss"] < 0.3


def test_probe_eval_matches_brute_force_fits(tmp_path, tiny_subject):
    """Every latent's pre-activation computed by hand (W_enc (x s - b_dec) + b_enc), one probe
    per latent and per channel by scipy, the min over them: in-sample and held-out CE agree."""
    model, tok = tiny_subject
    name, snippets = _last_word_task(tmp_path, n=120)
    sae = TopKSAE(32, 96, k=4, normalize="constant", seed=3)
    with torch.no_grad():
        sae.input_scale.fill_(3.0)
        sae.b_dec.normal_(0, 0.05)
        sae.b_enc.normal_(0, 0.05)
    r = probe_eval(sae, model, tok, "resid_post.1", snippets, max_per_class=64, shortlist=16)
    ids, tasks, _ = build_examples(snippets, tok, max_per_class=64, min_per_class=12)
    X = {sp: torch.stack([hook_acts(model, "resid_post.1", torch.tensor([ids[s]]))[0, p] for s, p, _ in tasks[name][sp]])
         for sp in ("train", "test")}
    y = {sp: np.array([lab for *_, lab in tasks[name][sp]], dtype=float) for sp in ("train", "test")}
    with torch.no_grad():
        pre = {sp: ((X[sp] * 3.0 - sae.b_dec) @ sae.W_enc.t() + sae.b_enc).double().numpy() for sp in X}
    for who, feats in (("sae", pre), ("residual", {sp: X[sp].double().numpy() for sp in X})):
        fits = [_scipy_ce(feats["train"][:, j], y["train"], feats["test"][:, j], y["test"])
                for j in range(feats["train"].shape[1])]
        best = int(np.argmin([f[0] for f in fits]))
        got = r.details["tasks"][name][who]
        assert got["train_ce"] == pytest.approx(fits[best][0], abs=1e-5)
        assert got["test_ce"] == pytest.approx(fits[best][1], abs=1e-4)
        assert got["feature"] == best
    assert r.metrics["eval/probe_loss"] == pytest.approx(r.details["tasks"][name]["sae"]["train_ce"])
