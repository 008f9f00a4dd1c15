"""Probe loss (PAPER.md "Metrics"; Gao et al. sec. 4.2): for every task and every latent, a 1-D
logistic regression σ(w·z_i + b) fitted by Newton's method on the latent's *pre-activation* z_i
(the dense encoder output before the top-k, so every latent has a value on every token); the
task's score is the best latent's cross-entropy; the metric is the mean over tasks. The same
probes on the raw hookpoint channels are the baseline.

Two numbers per task, from one fit on the task's training split:
  * in-sample (the paper's; ``eval/probe_loss``): min over latents of the training CE;
  * held-out (ours; ``eval/probe_loss_heldout``): the CE on held-out snippets of the latent
    with the lowest training CE. The in-sample minimum over n latents favours large
    dictionaries by selection alone (more latents, more lucky fits); the held-out one does not.
Classes are balanced per split, so chance is ln 2 = 0.693. The SAE − channels gaps get a
two-level bootstrap interval (tasks, then examples within a task; paired examples).

Cost: every latent of every task is ranked by three float32 Newton steps on its training
examples (the 2-parameter problems are nearly solved by then); the ``shortlist`` best get the
full float64 fit. Pre-activations are computed once per chunk of latents for all examples.
"""
from __future__ import annotations

import logging
import math
import random
import weakref
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.probe_tasks import Snippet
from sae_lit.evals.result import EvalResult
from sae_lit.evals.stats import mean_of_means_ci

log = logging.getLogger(__name__)

L2 = 1e-3  # on the standardised weight: keeps separable tasks finite


# --- the vectorised 1-D logistic regression --------------------------------------------------


def _example_loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Binary CE per example and feature [N, F] of p = sigmoid(w x + b) for x [N, F], y [N]."""
    z = x * w + b
    return nn.functional.softplus(z) - y[:, None] * z


def _loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean binary CE per feature [F]."""
    return _example_loss(w, b, x, y).mean(0)


@torch.no_grad()
def fit_1d_logistic(x: Tensor, y: Tensor, l2: float = L2, iters: int = 25,
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One logistic regression per column of x [N, F] (labels y [N] in {0, 1}), all at once by
    damped Newton steps on the 2-parameter problems (every feature's 2x2 Hessian in closed form,
    the best of a few step lengths kept per feature).

    Features are standardised on this data; the small L2 penalty (on the standardised weight)
    keeps separable tasks finite. Returns (w, b, mu, sd) to apply as sigmoid(w (x - mu)/sd + b)."""
    x, y = x.to(dtype), y.to(dtype)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    xs = (x - mu) / sd
    F = x.shape[1]
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(F, dtype=x.dtype, device=x.device)
    b = torch.full((F,), math.log(rate / (1 - rate)), dtype=x.dtype, device=x.device)
    best = _loss(w, b, xs, y) + 0.5 * l2 * w * w
    for _ in range(iters):
        p = torch.sigmoid(xs * w + b)
        r, s = p - y[:, None], p * (1 - p)
        gw, gb = (r * xs).mean(0) + l2 * w, r.mean(0)
        hww, hwb, hbb = (s * xs * xs).mean(0) + l2, (s * xs).mean(0), s.mean(0) + 1e-12
        det = (hww * hbb - hwb * hwb).clamp_min(1e-18)
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        improved = torch.zeros(F, dtype=torch.bool, device=x.device)
        for step in (1.0, 0.5, 0.1):
            w_try, b_try = w - step * dw, b - step * db
            l_try = _loss(w_try, b_try, xs, y) + 0.5 * l2 * w_try * w_try
            better = l_try < best - 1e-12
            w, b, best = torch.where(better, w_try, w), torch.where(better, b_try, b), torch.where(better, l_try, best)
            improved |= better
        if not bool(improved.any()):
            break
    return w, b, mu, sd


def probe_scores(x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None, y_test: Tensor | None = None,
                 iters: int = 25, chunk: int = 8192, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None]:
    """(train CE [F], held-out CE [F] or None without test data) of one 1-D probe per feature
    column, in feature chunks so the [N, chunk] temporaries stay small whatever the dictionary size."""
    tr, te = [], []
    for lo in range(0, x_train.shape[1], chunk):
        xtr = x_train[:, lo : lo + chunk]
        w, b, mu, sd = fit_1d_logistic(xtr, y_train, iters=iters, dtype=dtype)
        tr.append(_loss(w, b, (xtr.to(dtype) - mu) / sd, y_train.to(dtype)))
        if x_test is not None:
            te.append(_loss(w, b, (x_test[:, lo : lo + chunk].to(dtype) - mu) / sd, y_test.to(dtype)))
    return torch.cat(tr).float(), (torch.cat(te).float() if te else None)


def best_feature(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> dict:
    """Full fit of every column; the one with the lowest training CE: its in-sample CE (the
    paper's score), its held-out CE, and both per example (for the bootstrap)."""
    w, b, mu, sd = fit_1d_logistic(x_train, y_train)
    ytr, yte = y_train.double(), y_test.double()
    train_ce = _loss(w, b, (x_train.double() - mu) / sd, ytr)
    j = int(train_ce.argmin())
    ex_tr = _example_loss(w[j : j + 1], b[j : j + 1], (x_train[:, j : j + 1].double() - mu[j]) / sd[j], ytr)[:, 0]
    ex_te = _example_loss(w[j : j + 1], b[j : j + 1], (x_test[:, j : j + 1].double() - mu[j]) / sd[j], yte)[:, 0]
    return {"column": j, "train_ce": float(train_ce[j]), "test_ce": float(ex_te.mean()),
            "train_examples": ex_tr.float(), "test_examples": ex_te.float()}


def probe_features(features: Callable[[slice | Tensor, Tensor], Tensor], n_features: int, tasks: dict,
                   chunk: int = 1024, shortlist: int = 64) -> dict:
    """Best single feature per task among ``n_features`` that ``features(cols, rows)`` returns as
    [len(rows), len(cols)] float32 (rows index the example table; cols a slice or index tensor).

    ``tasks``: name -> (train rows, train labels, test rows, test labels). Stage 1 ranks every
    feature by three float32 Newton steps on the training rows, a chunk of features at a time
    for all tasks; stage 2 fits the ``shortlist`` best of each task in full (exact when
    n_features <= shortlist)."""
    cand: dict[str, tuple[Tensor, Tensor]] = {}
    if n_features > shortlist:
        all_rows = torch.unique(torch.cat([t[0] for t in tasks.values()]))
        pos = torch.full((int(all_rows.max()) + 1,), -1, dtype=torch.long)
        pos[all_rows] = torch.arange(all_rows.numel())
        for lo in range(0, n_features, chunk):
            hi = min(lo + chunk, n_features)
            P = features(slice(lo, hi), all_rows).float()
            for name, (r_tr, y_tr, _, _) in tasks.items():
                q, _ = probe_scores(P[pos[r_tr]], y_tr, iters=3, dtype=torch.float32)
                ce, idx = cand.get(name, (torch.empty(0), torch.empty(0, dtype=torch.long)))
                ce, idx = torch.cat([ce, q]), torch.cat([idx, torch.arange(lo, hi)])
                keep = ce.topk(min(shortlist, ce.numel()), largest=False).indices
                cand[name] = (ce[keep], idx[keep])
    out = {}
    for name, (r_tr, y_tr, r_te, y_te) in tasks.items():
        cols = cand[name][1].sort().values if name in cand else torch.arange(n_features)
        r = best_feature(features(cols, r_tr).float(), y_tr, features(cols, r_te).float(), y_te)
        r["feature"] = int(cols[r.pop("column")])
        out[name] = r
    return out


# --- examples: events -> (snippet, token position) ----------------------------------------


def _event_positions(offsets: np.ndarray, events) -> list[tuple[int, int]]:
    """(token index, label) of the last token overlapping each event; conflicting labels on one
    token are dropped (e.g. an LM token spanning a name and an operator)."""
    if len(offsets) == 0:
        return []
    starts, ends = offsets[:, 0], offsets[:, 1]
    labels: dict[int, int] = {}
    for s, e, lab in events:
        i = int(np.searchsorted(starts, e, side="left")) - 1
        if i < 0 or ends[i] <= s:
            continue
        labels[i] = lab if labels.get(i, lab) == lab else -1
    return [(i, lab) for i, lab in labels.items() if lab >= 0]


def build_examples(snippets: list[Snippet], tokenizer, max_per_class: int = 128, min_per_class: int = 12,
                   seed: int = 0) -> tuple[list[list[int]], dict[str, dict], dict[str, str]]:
    """Token ids per snippet (BOS first) and, per task, balanced train/test examples
    {"train": [(snippet, pos, label)], "test": [...]}. Train and test never share a snippet."""
    from sae_lit.data.corpus import special_ids

    bos, _ = special_ids(tokenizer)
    rng = random.Random(seed)
    ids, per_task = [], {}
    for sid, snip in enumerate(snippets):
        enc = tokenizer(snip.text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append([bos] + list(enc["input_ids"]))
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        for task, events in snip.events.items():
            for i, lab in _event_positions(offsets, events):
                per_task.setdefault(task, []).append((sid, i + 1, lab))  # +1: BOS
    order = list(range(len(snippets)))
    rng.shuffle(order)
    in_train = {sid: n % 2 == 0 for n, sid in enumerate(order)}
    tasks, skipped = {}, {}
    for task in sorted(per_task):
        split = {}
        for name, want in (("train", True), ("test", False)):
            ex = [e for e in per_task[task] if in_train[e[0]] == want]
            pos, neg = [e for e in ex if e[2] == 1], [e for e in ex if e[2] == 0]
            n = min(len(pos), len(neg), max_per_class)
            split[name] = rng.sample(pos, n) + rng.sample(neg, n)
        n_min = min(len(split["train"]), len(split["test"])) // 2
        if n_min < min_per_class:
            skipped[task] = f"only {n_min} examples per class in a split (< {min_per_class})"
            continue
        tasks[task] = split
    return ids, tasks, skipped


_ACTS_CACHE: dict = {}


@torch.no_grad()
def snippet_acts(model: nn.Module, hookpoint: str, ids: list[list[int]], wanted: dict[int, list[int]],
                 batch_size: int = 16, pad_id: int = 0) -> dict[tuple[int, int], Tensor]:
    """Hookpoint activations (float32, CPU) at the wanted positions of each snippet. Batches are
    right-padded: the model is causal, so padding after a position cannot change it.

    They depend on the model and snippets only, not on the SAE: the last result is kept, so
    evaluating many SAEs on one model (a sweep, validation every few hundred steps) runs the
    LM once."""
    key = (hookpoint, tuple(map(tuple, ids)), tuple((s, tuple(p)) for s, p in sorted(wanted.items())))
    ref = _ACTS_CACHE.get("model")
    if ref is not None and ref() is model and _ACTS_CACHE.get("key") == key:  # weakref: ids get reused
        return _ACTS_CACHE["out"]
    out = {}
    sids = sorted(wanted, key=lambda s: len(ids[s]))
    for lo in range(0, len(sids), batch_size):
        batch = sids[lo : lo + batch_size]
        L = max(len(ids[s]) for s in batch)
        x = torch.full((len(batch), L), pad_id, dtype=torch.long)
        for r, s in enumerate(batch):
            x[r, : len(ids[s])] = torch.tensor(ids[s])
        acts = hook_acts(model, hookpoint, x).float().cpu()
        for r, s in enumerate(batch):
            for p in wanted[s]:
                out[(s, p)] = acts[r, p]
    _ACTS_CACHE.update(model=weakref.ref(model), key=key, out=out)
    return out


# --- the eval ---------------------------------------------------------------------------------


def probe_eval(sae, model: nn.Module, tokenizer, hookpoint: str, snippets: list[Snippet],
               max_per_class: int = 1000, batch_size: int = 16, min_per_class: int = 12, shortlist: int = 64,
               seed: int = 0) -> EvalResult:
    """``max_per_class``: examples per class in each split (train, held-out) of a task, where the
    snippets have them."""
    sae = as_adapter(sae)
    ids, tasks, skipped = build_examples(snippets, tokenizer, max_per_class=max_per_class,
                                         min_per_class=min_per_class, seed=seed)
    if not tasks:
        return EvalResult({}, {"skipped": skipped, "note": "no task had enough examples"})
    wanted: dict[int, set] = {}
    for split in tasks.values():
        for ex in split["train"] + split["test"]:
            wanted.setdefault(ex[0], set()).add(ex[1])
    acts = snippet_acts(model, hookpoint, ids, {s: sorted(p) for s, p in wanted.items()}, batch_size)
    keys = list(acts)
    row = {k: i for i, k in enumerate(keys)}
    X = torch.stack([acts[k] for k in keys])  # [U, d] raw activations

    table = {}
    for task, split in tasks.items():
        r_tr = torch.tensor([row[(s, p)] for s, p, _ in split["train"]])
        r_te = torch.tensor([row[(s, p)] for s, p, _ in split["test"]])
        y_tr = torch.tensor([lab for *_, lab in split["train"]], dtype=torch.float32)
        y_te = torch.tensor([lab for *_, lab in split["test"]], dtype=torch.float32)
        table[task] = (r_tr, y_tr, r_te, y_te)

    def sae_features(cols, rows):
        return torch.cat([sae.pre_acts(X[rows[lo : lo + 4096]], latents=cols).float().cpu()
                          for lo in range(0, rows.numel(), 4096)])

    def channel_features(cols, rows):
        return X[rows][:, cols]

    best_sae = probe_features(sae_features, sae.num_latents, table, shortlist=shortlist)
    best_res = probe_features(channel_features, X.shape[1], table, shortlist=shortlist)
    results, gaps_in, gaps_out = {}, [], []
    for task, (r_tr, _, r_te, _) in table.items():
        a, c = best_sae[task], best_res[task]
        gaps_in.append((a.pop("train_examples") - c.pop("train_examples")).numpy())
        gaps_out.append((a.pop("test_examples") - c.pop("test_examples")).numpy())
        results[task] = {"n_train": int(r_tr.numel()), "n_test": int(r_te.numel()), "sae": a, "residual": c}

    def mean(who, key):
        return float(np.mean([r[who][key] for r in results.values()]))

    gap_in, gap_out = mean_of_means_ci(gaps_in, seed=seed), mean_of_means_ci(gaps_out, seed=seed)
    metrics = {
        "eval/probe_loss": mean("sae", "train_ce"), "eval/probe_loss_residual": mean("residual", "train_ce"),
        "eval/probe_loss_gap": gap_in["mean"], "eval/probe_loss_gap_ci_lo": gap_in["lo"],
        "eval/probe_loss_gap_ci_hi": gap_in["hi"],
        "eval/probe_loss_heldout": mean("sae", "test_ce"), "eval/probe_loss_heldout_residual": mean("residual", "test_ce"),
        "eval/probe_loss_heldout_gap": gap_out["mean"], "eval/probe_loss_heldout_gap_ci_lo": gap_out["lo"],
        "eval/probe_loss_heldout_gap_ci_hi": gap_out["hi"],
    }
    per_class = [min(r["n_train"], r["n_test"]) // 2 for r in results.values()]
    details = {"tasks": results, "skipped": skipped, "num_tasks": len(results), "chance_ce": math.log(2),
               "examples_tokens": int(X.shape[0]), "snippets": len(wanted), "lm_tokens": sum(len(i) for i in ids),
               "features": "SAE: pre-activations (before the top-k); residual: raw hookpoint channels",
               "examples_per_class_per_split": {"min": min(per_class), "median": float(np.median(per_class)),
                                                "max": max(per_class), "max_allowed": max_per_class},
               "tasks_at_max": sum(n >= max_per_class for n in per_class), "shortlist": shortlist,
               "gap_in_sample": gap_in, "gap_heldout": gap_out,
               "interval": "95% two-level bootstrap: tasks, then examples within a task (SAE and channels paired)"}
    return EvalResult(metrics, details, {"eval/probe_tasks": plot_probes(results)})


def plot_probes(results: dict):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = sorted(results, key=lambda t: results[t]["sae"]["train_ce"])
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y - 0.2, [results[t]["sae"]["train_ce"] for t in names], height=0.4, label="best SAE latent (pre-activation)")
    ax.barh(y + 0.2, [results[t]["residual"]["train_ce"] for t in names], height=0.4, label="best residual channel")
    ax.plot([results[t]["sae"]["test_ce"] for t in names], y - 0.2, "k|", ms=5, label="held-out CE")
    ax.plot([results[t]["residual"]["test_ce"] for t in names], y + 0.2, "k|", ms=5)
    ax.axvline(math.log(2), color="grey", ls=":", lw=0.8, label="chance")
    ax.set_yticks(y, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("CE of the best 1-D probe (nats; bars in-sample, ticks held-out)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
