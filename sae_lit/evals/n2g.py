"""N2G explainability (PAPER.md "Metrics"; Gao et al. sec. 4.4, after Foote et al. 2023):
explain a latent by n-gram patterns read off its top-activating contexts, then score how well
the patterns predict where it fires on held-out text.

For each sampled latent and each of its top activations (in the "explain" half of the blocks):
  1. the shortest suffix of the context (ending at the activating token, BOS prepended) whose
     activation keeps >= keep_fraction of the full-context one;
  2. within that suffix, a token whose replacement by a neutral token keeps >= keep_fraction of
     the suffix's activation is not salient and becomes a wildcard;
  3. the pattern is stored in a trie keyed from the activating token backwards.
On the other half of the blocks the latent is predicted to fire wherever the tokens ending at
a position match a pattern in the trie, and

    precision = |predicted & fired| / |predicted|,   recall = |predicted & fired| / |fired|

with "fired" = latent value > 0 (TopK: selected among the top k). ``eval/n2g_precision`` and
``eval/n2g_recall`` are means over sampled latents (precision over those that predicted
anything, recall over those that fired in the held-out half); F1 per latent in the details.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.result import EvalResult

WILDCARD = -1


# --- the trie --------------------------------------------------------------------------------


def trie_insert(trie: dict, pattern: list[int], activation: float) -> None:
    """pattern: token ids (WILDCARD for any), the activating token last."""
    node = trie
    for tok in reversed(pattern):
        node = node.setdefault("children", {}).setdefault(tok, {})
    node["end"] = True
    node["activations"] = node.get("activations", []) + [activation]


def trie_match(trie: dict, tokens: Tensor, first: int = 1) -> Tensor:
    """Bool [N, T]: positions t >= first of tokens [N, T] where some pattern ends. The walk is
    vectorised over positions: each trie edge filters the still-matching positions at once."""
    N, T = tokens.shape
    hit = torch.zeros(N, T, dtype=torch.bool)
    rows, cols = torch.meshgrid(torch.arange(N), torch.arange(first, T), indexing="ij")
    stack = [(trie, 0, rows.flatten(), cols.flatten())]
    while stack:
        node, depth, r, c = stack.pop()
        for tok, child in node.get("children", {}).items():
            ok = c - depth >= 0
            r2, c2 = r[ok], c[ok]
            if tok != WILDCARD:
                same = tokens[r2, c2 - depth] == tok
                r2, c2 = r2[same], c2[same]
            if r2.numel() == 0:
                continue
            if child.get("end"):
                hit[r2, c2] = True
            stack.append((child, depth + 1, r2, c2))
    return hit


# --- activations of one latent on many short sequences --------------------------------------


@torch.no_grad()
def _latent_acts(sae, model, hookpoint, seqs: list[list[int]], latents: list[int], batch_size: int = 64) -> Tensor:
    """Value of latents[i] at the last token of seqs[i] (0 where it is not selected)."""
    sae = as_adapter(sae)
    out = torch.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        L = max(len(seqs[i]) for i in idx)
        x = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(seqs[i])] = torch.tensor(seqs[i])  # right padding: causal, harmless
        h = hook_acts(model, hookpoint, x).float()
        last = h[torch.arange(len(idx)), torch.tensor([len(seqs[i]) - 1 for i in idx])]
        values, indices = sae.encode(last)
        want = torch.tensor([latents[i] for i in idx], device=indices.device)
        out[idx] = (values * (indices == want[:, None])).sum(-1).float().cpu()
    return out


# --- the eval ---------------------------------------------------------------------------------


@torch.no_grad()
def n2g_eval(sae, model: nn.Module, hookpoint: str, tokens: Tensor, acts: Tensor, bos_id: int, mask_id: int,
             n_latents: int = 32, top_examples: int = 8, max_suffix: int = 6, keep_fraction: float = 0.5,
             tokenizer=None, seed: int = 0) -> EvalResult:
    """``tokens`` [N, T] and cached hookpoint ``acts`` [N, T, d] of held-out blocks (BOS first;
    the BOS position is neither explained nor scored). Even blocks explain, odd blocks test."""
    sae = as_adapter(sae)
    N, T = tokens.shape
    if N < 2:
        raise ValueError(f"n2g needs at least 2 blocks (one to explain, one to test), got {N}")
    n_lat = sae.num_latents
    # Codes stay sparse: a dense [N*T, num_latents] copy would not fit for large dictionaries.
    flat = acts[:, 1:].reshape(-1, acts.shape[-1])
    enc = [sae.encode(flat[lo : lo + 4096]) for lo in range(0, flat.shape[0], 4096)]
    values = torch.cat([v.float().cpu() for v, _ in enc]).reshape(N, T - 1, -1)
    indices = torch.cat([i.cpu() for _, i in enc]).reshape(N, T - 1, -1)

    def latent_act(j: int, blocks: Tensor) -> Tensor:  # [len(blocks), T-1]
        return (values[blocks] * (indices[blocks] == j)).sum(-1)

    explain, test = torch.arange(0, N, 2), torch.arange(1, N, 2)
    fired_e = indices[explain][values[explain] > 0]
    fires_explain = torch.bincount(fired_e.flatten(), minlength=n_lat)
    g = torch.Generator().manual_seed(seed)
    candidates = (fires_explain >= max(2, top_examples // 2)).nonzero().squeeze(1)
    latents = candidates[torch.randperm(candidates.numel(), generator=g)[:n_latents]].tolist()

    # 1. shortest suffixes: all lengths of all top examples in one batched pass
    examples = []  # (latent, block, position, full activation)
    for j in latents:
        a = latent_act(j, explain)
        top = a.flatten().topk(min(top_examples, int((a > 0).sum()))).indices
        for f in top.tolist():
            b, t = int(explain[f // (T - 1)]), f % (T - 1) + 1
            examples.append((j, b, t, float(a.flatten()[f])))
    seqs, lat_of, owner = [], [], []
    for e, (j, b, t, _) in enumerate(examples):
        for L in range(1, min(max_suffix, t) + 1):
            seqs.append([bos_id] + tokens[b, t - L + 1 : t + 1].tolist())
            lat_of.append(j)
            owner.append((e, L))
    suffix_act = _latent_acts(sae, model, hookpoint, seqs, lat_of)
    by_example: dict[int, dict[int, float]] = {}
    for (e, L), v in zip(owner, suffix_act.tolist()):
        by_example.setdefault(e, {})[L] = v
    chosen = []
    for e, (j, b, t, a0) in enumerate(examples):
        acts_L = by_example[e]
        ok = [L for L in sorted(acts_L) if acts_L[L] >= keep_fraction * a0]
        L = ok[0] if ok else max(acts_L, key=acts_L.get)
        chosen.append((L, acts_L[L]))

    # 2. saliency: mask each non-final token of the chosen suffix
    seqs, lat_of, owner = [], [], []
    for e, ((j, b, t, _), (L, _)) in enumerate(zip(examples, chosen)):
        suffix = tokens[b, t - L + 1 : t + 1].tolist()
        for i in range(L - 1):
            seqs.append([bos_id] + suffix[:i] + [mask_id] + suffix[i + 1 :])
            lat_of.append(j)
            owner.append((e, i))
    masked = _latent_acts(sae, model, hookpoint, seqs, lat_of) if seqs else torch.zeros(0)
    wild = {(e, i) for (e, i), v in zip(owner, masked.tolist()) if chosen[e][1] > 0 and v >= keep_fraction * chosen[e][1]}

    # 3. tries, 4. held-out precision / recall
    explanations, precisions, recalls, f1s = {}, [], [], []
    test_tokens = tokens[test]
    for j in latents:
        trie: dict = {}
        patterns = []
        for e, ((jj, b, t, a0), (L, aL)) in enumerate(zip(examples, chosen)):
            if jj != j:
                continue
            suffix = tokens[b, t - L + 1 : t + 1].tolist()
            pattern = [WILDCARD if (e, i) in wild else tok for i, tok in enumerate(suffix)]
            while pattern and pattern[0] == WILDCARD:
                pattern = pattern[1:]  # a leading wildcard constrains nothing
            trie_insert(trie, pattern, a0)
            patterns.append(pattern)
        pred = trie_match(trie, test_tokens)[:, 1:]
        fired = latent_act(j, test) > 0
        tp = int((pred & fired).sum())
        n_pred, n_fired = int(pred.sum()), int(fired.sum())
        p = tp / n_pred if n_pred else float("nan")
        r = tp / n_fired if n_fired else float("nan")
        f1 = 2 * p * r / (p + r) if n_pred and n_fired and (p + r) > 0 else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(f1)
        explanations[str(j)] = {
            "patterns": [_show(pt, tokenizer) for pt in _unique(patterns)],
            "precision": p, "recall": r, "f1": f1, "predicted": n_pred, "fired": n_fired,
            "top_activations": [a0 for (jj, _, _, a0) in examples if jj == j],
            "trie": _trie_json(trie),
        }

    def nanmean(v):
        v = [a for a in v if a == a]
        return sum(v) / len(v) if v else float("nan")

    metrics = {"eval/n2g_precision": nanmean(precisions), "eval/n2g_recall": nanmean(recalls),
               "eval/n2g_f1": nanmean(f1s)}
    details = {"latents": len(latents), "candidates": int(candidates.numel()), "explain_blocks": len(explain),
               "test_blocks": len(test), "keep_fraction": keep_fraction, "max_suffix": max_suffix,
               "top_examples": top_examples, "explanations": explanations}
    return EvalResult(metrics, details)


def _unique(patterns):
    seen, out = set(), []
    for p in patterns:
        if tuple(p) not in seen:
            seen.add(tuple(p))
            out.append(p)
    return out


def _show(pattern: list[int], tokenizer) -> list[str]:
    if tokenizer is None:
        return ["*" if t == WILDCARD else str(t) for t in pattern]
    return ["*" if t == WILDCARD else tokenizer.decode([t]) for t in pattern]


def _trie_json(node: dict) -> dict:
    out = {k: v for k, v in node.items() if k != "children"}
    if "children" in node:
        out["children"] = {("*" if k == WILDCARD else str(k)): _trie_json(c) for k, c in node["children"].items()}
    return out
