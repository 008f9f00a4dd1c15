"""Probe loss (PAPER.md "Metrics"): for every task and every latent, a 1-D logistic regression
on that latent's activation; the task's score is the held-out cross-entropy of the best latent;
``eval/probe_loss`` is the mean over tasks. The same probes on the raw hookpoint channels are
the baseline (``eval/probe_loss_residual``): an SAE is only useful here if one of its latents
separates a task better than any single neuron-basis direction does.

"Best latent" is chosen by *training* CE and scored on held-out snippets: choosing it by the
held-out CE itself would reward dictionaries for size alone (more latents, more lucky draws).
Classes are balanced per split, so chance is ln 2 = 0.693.
"""
from __future__ import annotations

import logging
import math
import random
import weakref

import numpy as np
import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter, densify
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.probe_tasks import Snippet
from sae_lit.evals.result import EvalResult

log = logging.getLogger(__name__)


# --- the vectorised 1-D logistic regression --------------------------------------------------


def _loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean binary CE per feature [F] of p = sigmoid(w x + b) for x [N, F], y [N]."""
    z = x * w + b
    return (nn.functional.softplus(z) - y[:, None] * z).mean(0)


@torch.no_grad()
def fit_1d_logistic(x: Tensor, y: Tensor, l2: float = 1e-3, iters: int = 25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One logistic regression per column of x [N, F] (labels y [N] in {0, 1}), all at once by
    damped Newton steps on the 2-parameter problems (every feature's 2x2 Hessian in closed form,
    the best of a few step lengths kept per feature).

    Features are standardised on this data; the small L2 penalty (on the standardised weight)
    keeps separable tasks finite. Returns (w, b, mu, sd) to apply as sigmoid(w (x - mu)/sd + b)."""
    x, y = x.double(), y.double()
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
                 iters: int = 25, chunk: int = 8192) -> tuple[Tensor, Tensor | None]:
    """(train CE [F], held-out CE [F] or None without test data) of one 1-D probe per feature
    column, in feature chunks so the [N, chunk] temporaries stay small whatever the dictionary size."""
    tr, te = [], []
    for lo in range(0, x_train.shape[1], chunk):
        xtr = x_train[:, lo : lo + chunk]
        w, b, mu, sd = fit_1d_logistic(xtr, y_train, iters=iters)
        tr.append(_loss(w, b, (xtr.double() - mu) / sd, y_train.double()))
        if x_test is not None:
            te.append(_loss(w, b, (x_test[:, lo : lo + chunk].double() - mu) / sd, y_test.double()))
    return torch.cat(tr).float(), (torch.cat(te).float() if te else None)


def best_feature(x_train, y_train, x_test, y_test, active: Tensor | None = None, shortlist: int = 64) -> dict:
    """Pick the feature with the lowest training CE (among `active` columns if given: features
    that are constant on the training set cannot beat the intercept-only probe).

    Two stages, because a full fit of every latent of a large dictionary on every task is most
    of the eval's time: three Newton steps for all features rank them (the 2-parameter problems
    are nearly solved by then), and the `shortlist` best get the full fit."""
    cols = active if active is not None else torch.arange(x_train.shape[1])
    if cols.numel() == 0:
        rate = float(y_train.float().mean())
        ce = -(rate * math.log(max(rate, 1e-12)) + (1 - rate) * math.log(max(1 - rate, 1e-12)))
        return {"feature": None, "train_ce": ce, "test_ce": ce}
    if cols.numel() > shortlist:
        quick, _ = probe_scores(x_train[:, cols], y_train, iters=3)
        cols = cols[quick.topk(shortlist, largest=False).indices]
    tr, te = probe_scores(x_train[:, cols], y_train, x_test[:, cols], y_test)
    j = int(tr.argmin())
    return {"feature": int(cols[j]), "train_ce": float(tr[j]), "test_ce": float(te[j]), "best_test_ce_any": float(te.min())}


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
               max_per_class: int = 128, batch_size: int = 16, seed: int = 0) -> EvalResult:
    sae = as_adapter(sae)
    ids, tasks, skipped = build_examples(snippets, tokenizer, max_per_class=max_per_class, seed=seed)
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
    n_lat = sae.num_latents
    values, indices = [], []
    for lo in range(0, X.shape[0], 2048):
        v, i = sae.encode(X[lo : lo + 2048])
        values.append(v.float().cpu())
        indices.append(i.cpu())
    values, indices = torch.cat(values), torch.cat(indices)

    results = {}
    for task, split in tasks.items():
        r_tr = torch.tensor([row[(s, p)] for s, p, _ in split["train"]])
        r_te = torch.tensor([row[(s, p)] for s, p, _ in split["test"]])
        y_tr = torch.tensor([lab for *_, lab in split["train"]], dtype=torch.float32)
        y_te = torch.tensor([lab for *_, lab in split["test"]], dtype=torch.float32)
        z_tr = densify(values[r_tr], indices[r_tr], n_lat)
        z_te = densify(values[r_te], indices[r_te], n_lat)
        active = ((z_tr != 0).any(0)).nonzero().squeeze(1)
        sae_r = best_feature(z_tr, y_tr, z_te, y_te, active)
        res_r = best_feature(X[r_tr], y_tr, X[r_te], y_te)
        results[task] = {"n_train": len(y_tr), "n_test": len(y_te), "sae": sae_r, "residual": res_r}
    sae_mean = float(np.mean([r["sae"]["test_ce"] for r in results.values()]))
    res_mean = float(np.mean([r["residual"]["test_ce"] for r in results.values()]))
    metrics = {"eval/probe_loss": sae_mean, "eval/probe_loss_residual": res_mean}
    details = {"tasks": results, "skipped": skipped, "num_tasks": len(results), "chance_ce": math.log(2),
               "examples_tokens": int(X.shape[0]), "snippets": len(wanted)}
    return EvalResult(metrics, details, {"eval/probe_tasks": plot_probes(results)})


def plot_probes(results: dict):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = sorted(results, key=lambda t: results[t]["sae"]["test_ce"])
    fig, ax = plt.subplots(figsize=(6, 0.18 * len(names) + 1.2))
    y = np.arange(len(names))
    ax.barh(y - 0.2, [results[t]["sae"]["test_ce"] for t in names], height=0.4, label="best SAE latent")
    ax.barh(y + 0.2, [results[t]["residual"]["test_ce"] for t in names], height=0.4, label="best residual channel")
    ax.axvline(math.log(2), color="grey", ls=":", lw=0.8, label="chance")
    ax.set_yticks(y, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("held-out CE of the best 1-D probe (nats)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
