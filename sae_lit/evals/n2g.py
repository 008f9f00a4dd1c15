"""N2G explainability (PAPER.md "Metrics"; Gao et al. sec. 4.4, after Foote et al. 2023),
following OpenAI's released ``sparse_autoencoder/explanations.py``: explain a latent by n-gram
patterns read off some of its activations, then score how well the patterns predict where it
fires on held-out text.

For each sampled latent, its examples are its top activations (the largest in each of the
best blocks) and random positive activations (sampled over activations, not blocks), in the
"explain" half of the blocks, each cut after the activating token. For each example:
  1. the shortest suffix ending at the activating token whose activation is ≥ 50% of the
     example's; if none is, the whole context (the reference's fallback);
  2. whether a filler token placed before that suffix keeps ≥ 50%: if not, the pattern is
     anchored to the start of the sequence;
  3. each token of the suffix, the last one included, is replaced by the filler token; a token
     whose replacement keeps > 50% of the suffix's activation (saliency 1 − act/act_suffix
     < 0.5) becomes a wildcard;
  4. the pattern goes into a trie, keyed from the activating token backwards.
Every sequence the subject model sees here starts with BOS (as its contexts do); the filler is
an ordinary, neutral token (" _" as in the reference, for GPT-2), never BOS or a separator.

Prediction walks the trie backwards from each position, taking the exact token's branch when
there is one and the wildcard's otherwise (greedy, no backtracking), and predicts the stored
activation at the first pattern end, or at the start anchor when the walk reaches the first
token after BOS. On the other half of the blocks

    precision = |predicted ∧ fired| / |predicted|,   recall = |predicted ∧ fired| / |fired|

with "fired" = latent value > 0 (TopK: selected among the top k). A latent that predicts
nothing has no precision, one that never fires no recall (NaN, left out of the means, counted
in the details); F1 is NaN when either is. Intervals: bootstrap over latents.

Budget (``max_suffix``): the reference tries every suffix length and masks every token of the
chosen suffix, which costs ~L² token forwards for an example whose suffix is its whole
context of L tokens. ``context_length`` cuts the explain blocks (exactly: the model is causal,
so activations before the cut do not change); ``max_suffix`` (None = the reference) stops the
search at that length, falls back to the whole context as the reference does, and treats the
fallback's tokens before its last ``max_suffix`` as wildcards instead of masking each.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import hook_acts
from sae_lit.evals.result import EvalResult
from sae_lit.evals.stats import mean_ci

WILDCARD = -1
START = -2
ACT = "act"
KEEP = 0.5  # the reference's threshold, for the suffix, the start anchor and the saliency


def filler_token(tokenizer, candidates: tuple[str, ...] = (" _", "_")) -> int:
    """The masking token: the first of ``candidates`` that is one ordinary token (the reference
    uses GPT-2's " _"); an error naming the tokenizer when none is (pass mask_id explicitly)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for text in candidates:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in special:
            return int(ids[0])
    raise ValueError(f"n2g: none of {list(candidates)} is a single ordinary token of {type(tokenizer).__name__}; "
                     "pass a neutral filler token id as mask_id")


# --- the trie (explanations.py's NtgExplanation) ----------------------------------------------


def trie_insert(trie: dict, tokens: list[int], salient: list[bool], act: float, anchored: bool = False) -> None:
    """One pattern: ``tokens`` ending at the activating token, non-salient ones as wildcards,
    ``anchored`` = only at the start of a sequence."""
    node = trie
    for tok, sal in zip(reversed(tokens), reversed(salient)):
        node = node.setdefault(tok if sal else WILDCARD, {})
    if anchored:
        node = node.setdefault(START, {})
    node[ACT] = act


def trie_predict(trie: dict, tokens: Tensor) -> Tensor:
    """Predicted activation [N, T] at every position of tokens [N, T] (sequences that start
    right after BOS; position 0 is their first token), by the greedy walk described above.
    Vectorised over positions: each step moves every still-walking position one node down."""
    N, T = tokens.shape
    pred = torch.zeros(N, T)
    nodes, index = [], {}

    def number(node: dict) -> None:
        index[id(node)] = len(nodes)
        nodes.append(node)
        for k, child in node.items():
            if k != ACT:
                number(child)

    number(trie)
    rows, cols = (a.flatten() for a in torch.meshgrid(torch.arange(N), torch.arange(T), indexing="ij"))
    node_ids, r, c = torch.zeros(rows.numel(), dtype=torch.long), rows, cols
    depth = 0
    while node_ids.numel():
        j = c - depth  # the token this step reads
        tok = tokens[r, j]
        nxt = torch.full_like(node_ids, -1)
        for nid in node_ids.unique().tolist():
            here = (node_ids == nid).nonzero().squeeze(1)
            children = nodes[nid]
            if WILDCARD in children:
                nxt[here] = index[id(children[WILDCARD])]
            for t, sub in children.items():
                if isinstance(t, int) and t >= 0:
                    nxt[here[tok[here] == t]] = index[id(sub)]  # the exact token before the wildcard
        alive = nxt >= 0
        node_ids, r, c, j = nxt[alive], r[alive], c[alive], j[alive]
        done = torch.zeros(node_ids.numel(), dtype=torch.bool)
        for nid in node_ids.unique().tolist():
            node = nodes[nid]
            here = node_ids == nid
            if ACT in node:
                pred[r[here], c[here]] = node[ACT]
                done |= here
                continue
            first = here & (j == 0)  # the walk reached the first token: only the start anchor is left
            if START in node:
                pred[r[first], c[first]] = node[START][ACT]
            done |= first
        node_ids, r, c = node_ids[~done], r[~done], c[~done]
        depth += 1
    return pred


# --- activations of one latent at the last token of many short sequences ----------------------


class _LatentActs:
    def __init__(self, sae, model, hookpoint, bos_id: int, batch_size: int = 64):
        self.sae, self.model, self.hookpoint, self.bos = sae, model, hookpoint, bos_id
        self.batch_size = batch_size
        self.tokens = 0

    @torch.no_grad()
    def __call__(self, seqs: list[list[int]], latents: list[int]) -> list[float]:
        """Value of latents[i] at the last token of [BOS] + seqs[i] (0 where not selected)."""
        out = torch.zeros(len(seqs))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            L = max(len(seqs[i]) for i in idx) + 1
            x = torch.full((len(idx), L), self.bos, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, 1 : 1 + len(seqs[i])] = torch.tensor(seqs[i])  # right padding: causal, harmless
            self.tokens += x.numel()
            h = hook_acts(self.model, self.hookpoint, x).float()
            last = h[torch.arange(len(idx)), torch.tensor([len(seqs[i]) for i in idx])]
            values, indices = self.sae.encode(last)
            want = torch.tensor([latents[i] for i in idx], device=indices.device)
            out[idx] = (values * (indices == want[:, None])).sum(-1).float().cpu()
        return out.tolist()


def explain(examples: list[dict], model_fn, mask_id: int, max_suffix: int | None = None) -> dict:
    """The trie of one latent from ``examples`` [{"tokens": context up to and including the
    activating token (no BOS), "act": its activation}], as explanations.py's
    create_n2g_explanation builds it. ``model_fn(seqs) -> activations at their last token``.
    Each example gets "suffix", "suffix_act", "fallback", "anchored", "salient"."""
    for ex in examples:
        ex.setdefault("latent", 0)
    return build_explanations(examples, lambda seqs, _latents: model_fn(seqs), mask_id, max_suffix).get(0, {})


def build_explanations(examples: list[dict], model_fn, mask_id: int, max_suffix: int | None = None) -> dict[int, dict]:
    """``explain`` for many latents at once (each example names its "latent"), so every model
    call batches sequences of all of them: ``model_fn(seqs, latents)``. Returns latent -> trie."""
    # 1. shortest suffix keeping >= KEEP of the activation, all examples a length at a time
    todo = list(range(len(examples)))
    L = 1
    while todo:
        todo = [e for e in todo if L <= len(examples[e]["tokens"]) and (max_suffix is None or L <= max_suffix)]
        if not todo:
            break
        acts = model_fn([examples[e]["tokens"][-L:] for e in todo], [examples[e]["latent"] for e in todo])
        left = []
        for e, a in zip(todo, acts):
            if a / examples[e]["act"] >= KEEP:
                examples[e].update(suffix=examples[e]["tokens"][-L:], suffix_act=a, fallback=False)
            else:
                left.append(e)
        todo, L = left, L + 1
    for ex in examples:
        if "suffix" not in ex:  # the reference's fallback: the whole context, its own activation
            ex.update(suffix=list(ex["tokens"]), suffix_act=ex["act"], fallback=True)
    # 2. can a filler token precede the suffix?
    acts = model_fn([[mask_id] + ex["suffix"] for ex in examples], [ex["latent"] for ex in examples]) if examples else []
    for ex, a in zip(examples, acts):
        ex["anchored"] = not a / ex["act"] >= KEEP
    # 3. saliency of every token, the last included (for a capped fallback: its last max_suffix)
    seqs, owner = [], []
    for e, ex in enumerate(examples):
        n = len(ex["suffix"])
        first = n - max_suffix if (ex["fallback"] and max_suffix is not None and n > max_suffix) else 0
        ex["salient"] = [False] * n
        for i in range(first, n):
            seqs.append(ex["suffix"][:i] + [mask_id] + ex["suffix"][i + 1 :])
            owner.append((e, i))
    for (e, i), a in zip(owner, model_fn(seqs, [examples[e]["latent"] for e, _ in owner]) if seqs else []):
        ex = examples[e]
        ex["salient"][i] = not (1 - a / ex["suffix_act"]) < KEEP
    tries: dict[int, dict] = {}
    for ex in examples:
        trie_insert(tries.setdefault(ex["latent"], {}), ex["suffix"], ex["salient"], ex["suffix_act"], ex["anchored"])
    return tries


def _examples_of(a: Tensor, top: int, random: int, g: torch.Generator) -> list[tuple[int, int, str]]:
    """(block, position, kind) of a latent's top activations (the largest of each of the ``top``
    best blocks) and ``random`` other positive activations, from its activations a [B, T]."""
    best, where = a.max(1)
    blocks = [b for b in best.argsort(descending=True).tolist() if best[b] > 0][:top]
    out = [(b, int(where[b]), "top") for b in blocks]
    taken = {(b, t) for b, t, _ in out}
    pos = [(int(b), int(t)) for b, t in (a > 0).nonzero().tolist() if (int(b), int(t)) not in taken]
    for i in torch.randperm(len(pos), generator=g)[:random].tolist():
        out.append((*pos[i], "random"))
    return out


# --- the eval ---------------------------------------------------------------------------------


@torch.no_grad()
def n2g_eval(sae, model: nn.Module, hookpoint: str, tokens: Tensor, acts: Tensor, bos_id: int, mask_id: int,
             n_latents: int = 32, top_examples: int = 8, random_examples: int = 8, max_suffix: int | None = None,
             context_length: int | None = None, tokenizer=None, seed: int = 0) -> EvalResult:
    """``tokens`` [N, T] and cached hookpoint ``acts`` [N, T, d] of held-out blocks (BOS first;
    the BOS position is neither explained nor scored). Even blocks explain (their first
    ``context_length`` tokens), odd blocks test."""
    sae = as_adapter(sae)
    N, T = tokens.shape
    if N < 2:
        raise ValueError(f"n2g needs at least 2 blocks (one to explain, one to test), got {N}")
    if mask_id == bos_id:
        raise ValueError("n2g: mask_id is the BOS token; the reference masks with a neutral filler token")
    n_lat = sae.num_latents
    # Codes stay sparse: a dense [N*T, num_latents] copy would not fit for large dictionaries.
    flat = acts[:, 1:].reshape(-1, acts.shape[-1])
    enc = [sae.encode(flat[lo : lo + 4096]) for lo in range(0, flat.shape[0], 4096)]
    values = torch.cat([v.float().cpu() for v, _ in enc]).reshape(N, T - 1, -1)
    indices = torch.cat([i.cpu() for _, i in enc]).reshape(N, T - 1, -1)
    Te = min(T, context_length or T) - 1  # explained positions per block (BOS excluded)

    def latent_act(j: int, blocks: Tensor, upto: int = T - 1) -> Tensor:  # [len(blocks), upto]
        return (values[blocks, :upto] * (indices[blocks, :upto] == j)).sum(-1)

    explain_blocks, test = torch.arange(0, N, 2), torch.arange(1, N, 2)
    fired_e = indices[explain_blocks, :Te][values[explain_blocks, :Te] > 0]
    fires_explain = torch.bincount(fired_e.flatten(), minlength=n_lat)
    g = torch.Generator().manual_seed(seed)
    candidates = (fires_explain >= 2).nonzero().squeeze(1)
    latents = candidates[torch.randperm(candidates.numel(), generator=g)[:n_latents]].tolist()

    fn = _LatentActs(sae, model, hookpoint, bos_id)
    test_tokens = tokens[test, 1:]
    examples: dict[int, list[dict]] = {}
    for j in latents:
        a = latent_act(j, explain_blocks, Te)
        for b, t, kind in _examples_of(a, top_examples, random_examples, g):
            blk = int(explain_blocks[b])
            examples.setdefault(j, []).append({"tokens": tokens[blk, 1 : t + 2].tolist(), "act": float(a[b, t]),
                                               "kind": kind, "latent": j})
    tries = build_explanations([ex for j in latents for ex in examples.get(j, [])], fn, mask_id, max_suffix)
    explanations, scores = {}, {"precision": [], "recall": [], "f1": []}
    fallbacks = anchored = n_examples = 0
    for j in latents:
        trie, exs = tries.get(j, {}), examples.get(j, [])
        pred = trie_predict(trie, test_tokens) > 0
        fired = latent_act(j, test) > 0
        tp, n_pred, n_fired = int((pred & fired).sum()), int(pred.sum()), int(fired.sum())
        p = tp / n_pred if n_pred else float("nan")
        r = tp / n_fired if n_fired else float("nan")
        f1 = float("nan") if math.isnan(p) or math.isnan(r) else (2 * p * r / (p + r) if p + r > 0 else 0.0)
        for k, v in (("precision", p), ("recall", r), ("f1", f1)):
            scores[k].append(v)
        fallbacks += sum(ex["fallback"] for ex in exs)
        anchored += sum(ex["anchored"] for ex in exs)
        n_examples += len(exs)
        explanations[str(j)] = {
            "precision": p, "recall": r, "f1": f1, "predicted": n_pred, "fired": n_fired,
            # token strings ("*": any token, "^": the start of the text), as the dashboard shows them
            "patterns": _unique([_show(ex, tokenizer) for ex in exs]),
            "examples": [{k: ex[k] for k in ("kind", "act", "suffix_act", "fallback", "anchored")} for ex in exs],
            "trie": _trie_json(trie),
        }

    ci = {k: mean_ci(v, seed=seed) for k, v in scores.items()}
    metrics = {}
    for k in ("precision", "recall", "f1"):
        metrics.update({f"eval/n2g_{k}": ci[k]["mean"], f"eval/n2g_{k}_ci_lo": ci[k]["lo"], f"eval/n2g_{k}_ci_hi": ci[k]["hi"]})
    details = {"latents": len(latents), "candidates": int(candidates.numel()), "explain_blocks": len(explain_blocks),
               "test_blocks": len(test), "explain_context_length": Te + 1, "max_suffix": max_suffix,
               "top_examples": top_examples, "random_examples": random_examples, "mask_id": mask_id,
               "examples": n_examples, "fallback_examples": fallbacks, "anchored_examples": anchored,
               "lm_tokens": fn.tokens, "intervals": ci,
               "latents_with_precision": ci["precision"]["n"], "latents_with_recall": ci["recall"]["n"],
               "interval": "95% percentile bootstrap over latents (NaNs left out)",
               "explanations": explanations}
    return EvalResult(metrics, details)


def _show(ex: dict, tokenizer) -> list[str]:
    def tok(t, sal):
        if not sal:
            return "*"
        return tokenizer.decode([t]) if tokenizer is not None else str(t)

    return (["^"] if ex["anchored"] else []) + [tok(t, s) for t, s in zip(ex["suffix"], ex["salient"])]


def _unique(patterns: list[list[str]]) -> list[list[str]]:
    return [list(p) for p in dict.fromkeys(tuple(p) for p in patterns)]


def _trie_json(node: dict) -> dict:
    names = {WILDCARD: "*", START: "^"}
    return {(names.get(k, str(k)) if k != ACT else ACT): (_trie_json(v) if isinstance(v, dict) else v)
            for k, v in node.items()}
