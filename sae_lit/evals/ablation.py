"""Ablation sparsity (PAPER.md "Metrics"; Gao et al. sec. 4.5): how many output logits one
latent at one token moves.

For a sampled (latent i, position t) with the latent active at t, the hookpoint activation at
t becomes x_t − z_ti·d_i (d_i the latent's raw-space decoder vector): only that latent's
contribution is removed, the SAE's error term stays in. Δ = the change of the V logits at t and
at the T − 1 positions after it (T = ``window`` = 16, so only positions with t + T ≤ context
length are sampled). At each position the median of its V differences is subtracted (a
constant shift leaves the softmax unchanged), the T positions are concatenated into V·T
numbers, and

    sparsity = (‖Δ‖₁ / ‖Δ‖₂)² / (V·T)

which is 1/(V·T) when one logit moves and about 2/π for a dense Gaussian effect. The baseline
zeroes one random residual channel at the same positions (paper: ≈ 0.6 for GPT-2 small).

``eval/ablation_sparsity_per_position`` (a variant, reported beside it): each position's own
(‖Δ_t‖₁/‖Δ_t‖₂)² / V, averaged over the T positions. The concatenated measure also calls an
effect sparse when it is dense over the vocabulary but concentrated in time: on SmolLM2-135M
(resid_post.15) a zeroed channel moves every position's logits densely (≈ 0.63 per position)
but the ablated position carries 20–40% of the L2 mass, and the concatenation gives ≈ 0.25.

The subject model runs in float32 whatever its dtype elsewhere (bfloat16 rounding moves every
logit a little, which this measure would count as a dense effect). Each position's ablations
run in one batch with an unedited row, continuing the same cached prefix, so the clean and the
ablated logits come from the same computation; ``details["noise_floor"]`` is the largest
logit difference left by a zero edit, the floor under every Δ.

Intervals: percentile bootstrap over contexts (pairs in one context share its text).
"""
from __future__ import annotations

import copy
import inspect
import logging

import numpy as np
import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import edit_hookpoint, float32_model, hook_acts, model_device
from sae_lit.evals.result import EvalResult
from sae_lit.evals.stats import bootstrap_ci, mean_ci

log = logging.getLogger(__name__)

WINDOW = 16  # T in the paper


def _centred(delta: Tensor, center: str | None) -> np.ndarray:
    x = delta.detach().cpu().numpy()
    d = x.astype(np.float64)
    if center == "median":
        # The true median (the mean of the two middle values for even V), by a partial sort:
        # a full sort of 16 x 49k logits per pair would be most of the eval's time.
        V = x.shape[-1]
        mid = np.partition(x, [(V - 1) // 2, V // 2], axis=-1)
        d -= (mid[..., (V - 1) // 2].astype(np.float64) + mid[..., V // 2])[..., None] / 2
    elif center == "mean":
        d -= d.mean(-1, keepdims=True)
    elif center is not None:
        raise ValueError(f"center must be 'median', 'mean' or None, got {center!r}")
    return d


def _ratio(d: np.ndarray) -> float:
    l2 = float(np.sqrt((d * d).sum()))
    return float("nan") if l2 == 0 else float((np.abs(d).sum() / l2) ** 2 / d.size)


def sparsity_of(delta: Tensor, center: str | None = "median") -> float:
    """(‖Δ‖₁/‖Δ‖₂)² / numel of Δ [T, V] after subtracting each position's median (``center``
    "median", the paper's), mean ("mean") or nothing (None); nan if nothing moved."""
    return _ratio(_centred(delta, center))


def sparsity_per_position(delta: Tensor) -> float:
    """The mean over positions of each position's own (‖Δ_t‖₁/‖Δ_t‖₂)² / V (median removed):
    the paper's measure with every position weighted alike. The concatenated measure is also
    sparse when the effect is dense over the vocabulary but concentrated in a few positions
    (an effect decaying after t); this one isolates the vocabulary side (a dense effect: 2/π)."""
    d = _centred(delta, "median")
    per = [_ratio(row[None]) for row in d]
    per = [v for v in per if v == v]
    return float(np.mean(per)) if per else float("nan")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Runner:
    """Batches of one clean row plus ablated rows, each ablation at position t of one context,
    returning the logits at t .. t + window − 1.

    With a KV cache the prefix before t is run once per context and each batch only runs the
    ``window`` tokens after it; models whose cache cannot be copied and repeated fall back to
    running the whole prefix for every row (same numbers, more compute)."""

    def __init__(self, model: nn.Module, hookpoint: str, window: int, use_cache: bool = True):
        self.model, self.hookpoint, self.window = model, hookpoint, window
        self.device = model_device(model)
        self.keep = _accepts(model, "logits_to_keep")
        # transformers >= 5.24 names the cache argument (and output) `cache`, older ones `past_key_values`
        self.cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
        self.use_cache = use_cache
        self.tokens = 0  # LM tokens forwarded (for the cost breakdown)

    def _forward(self, ids: Tensor, past=None, keep: int | None = None):
        kw = {"logits_to_keep": keep} if (self.keep and keep) else {}
        if past is not None:
            kw[self.cache_arg] = past
        self.tokens += ids.numel()
        return self.model(input_ids=ids.to(self.device), use_cache=past is not None or self.use_cache, **kw)

    def _edited(self, ids: Tensor, pos: int, deltas: Tensor, past=None) -> Tensor:
        """ids [R, L] (row 0 clean); deltas [R-1, d] subtracted at position ``pos`` of rows 1.."""
        edit = torch.zeros(ids.shape[0], ids.shape[1], deltas.shape[-1], dtype=torch.float32)
        edit[1:, pos] = deltas
        edit = edit.to(self.device)

        def apply(h: Tensor) -> Tensor:
            return h - edit.to(h.dtype)

        with edit_hookpoint(self.model, self.hookpoint, apply):
            out = self._forward(ids, past=past, keep=self.window)
        return out.logits[:, -self.window :].float()

    @torch.no_grad()
    def context(self, ids: Tensor, groups: list[tuple[int, Tensor]]) -> list[Tensor]:
        """ids [T]; groups [(t, deltas [m, d])] in increasing t. Returns per group the logits
        [m + 1, window, V] at t .. t + window − 1 (row 0 clean)."""
        if self.use_cache:
            try:
                return self._cached(ids, groups)
            except (AttributeError, TypeError, NotImplementedError, RuntimeError) as e:
                log.info("ablation: KV-cache path unavailable for %s (%s); running full prefixes",
                         type(self.model).__name__, e)
                self.use_cache = False
        out = []
        for t, deltas in groups:
            rows = ids[: t + self.window].expand(deltas.shape[0] + 1, -1)
            out.append(self._edited(rows, t, deltas).cpu())
        return out

    def _cached(self, ids: Tensor, groups: list[tuple[int, Tensor]]) -> list[Tensor]:
        out, past, done = [], None, 0
        for t, deltas in groups:
            if t > done:
                past = getattr(self._forward(ids[None, done:t], past=past if past is not None else _new_cache(), keep=1),
                               self.cache_arg)
                done = t
            m = deltas.shape[0] + 1
            rows = ids[None, t : t + self.window].expand(m, -1)
            if past is None:  # t = 0: nothing before it
                out.append(self._edited(rows, 0, deltas).cpu())
                continue
            branch = copy.deepcopy(past)
            branch.batch_repeat_interleave(m)
            out.append(self._edited(rows, 0, deltas, past=branch).cpu())
        return out


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _sample_pairs(sae, h: Tensor, eligible: Tensor, positions: int, per_position: int, g: torch.Generator):
    """Up to ``positions`` eligible positions with an active latent, and at each up to
    ``per_position`` distinct active latents: [(t, latents [m], values [m])]."""
    values, indices = sae.encode(h[eligible])
    values, indices = values.float().cpu(), indices.cpu()
    rows = (values > 0).any(-1).nonzero().squeeze(1)
    rows = rows[torch.randperm(rows.numel(), generator=g)[:positions]].sort().values
    out = []
    for r in rows.tolist():
        act = (values[r] > 0).nonzero().squeeze(1)
        pick = act[torch.randperm(act.numel(), generator=g)[:per_position]]
        out.append((int(eligible[r]), indices[r, pick], values[r, pick]))
    return out


@torch.no_grad()
def ablation_sparsity(sae, model: nn.Module, hookpoint: str, contexts: Tensor, positions_per_context: int = 4,
                      latents_per_position: int = 2, window: int = WINDOW, baseline: bool = True,
                      exclude_bos: bool = True, outlier_threshold: float | None = None, use_cache: bool = True,
                      seed: int = 0) -> EvalResult:
    """``contexts`` [N, L] token ids (BOS first). Ablates ``latents_per_position`` active latents
    (and as many random channels) at each of ``positions_per_context`` positions t with
    t + window ≤ L (BOS and tokens above ``outlier_threshold``, which training skipped, left out)."""
    sae = as_adapter(sae)
    model = float32_model(model)
    runner = _Runner(model, hookpoint, window, use_cache=use_cache)
    g = torch.Generator().manual_seed(seed)
    N, L = contexts.shape
    start = 1 if exclude_bos else 0
    if L - window < start:
        raise ValueError(f"ablation: contexts of {L} tokens leave no position t with t + {window} <= {L}; "
                         f"use ablation_context_length >= {window + start}")
    rec: dict[str, list] = {k: [] for k in ("sae", "channel", "sae_per_position", "channel_per_position", "sae_uncentred",
                                            "channel_uncentred", "context")}
    pairs, floor, skipped = [], 0.0, 0
    for n, ids in enumerate(contexts):
        h = hook_acts(model, hookpoint, ids[None])[0].float().cpu()  # [L, d]
        runner.tokens += L
        eligible = torch.arange(start, L - window + 1)
        if outlier_threshold is not None:
            eligible = eligible[h[eligible].norm(dim=-1) <= outlier_threshold]
        chosen = _sample_pairs(sae, h, eligible, positions_per_context, latents_per_position, g) if eligible.numel() else []
        if not chosen:
            skipped += 1
            continue
        groups = []
        for i, (t, lat, val) in enumerate(chosen):
            dirs = sae.decoder_directions(h[t].expand(lat.numel(), -1), lat[:, None])[:, 0].float().cpu()
            deltas = [val[:, None] * dirs]
            if i == 0:  # one zero edit per context: the noise floor
                deltas.append(torch.zeros(1, h.shape[1]))
            chans = torch.randint(0, h.shape[1], (lat.numel(),), generator=g)
            if baseline:
                d = torch.zeros(lat.numel(), h.shape[1])
                d[torch.arange(lat.numel()), chans] = h[t, chans]
                deltas.append(d)
            groups.append((t, torch.cat(deltas), chans))
        outs = runner.context(ids, [(t, deltas) for t, deltas, _ in groups])
        for i, ((t, lat, _), (_, _, chans), out) in enumerate(zip(chosen, groups, outs)):
            m = lat.numel()
            diff = out[1:] - out[0]  # [rows, window, V]
            if i == 0:
                floor = max(floor, float(diff[m].abs().max()))
            first_channel = m + (i == 0)
            for j in range(m):
                pair = {"context": n, "position": t, "latent": int(lat[j]), "sae": sparsity_of(diff[j]),
                        "sae_per_position": sparsity_per_position(diff[j])}
                rec["sae"].append(pair["sae"])
                rec["sae_per_position"].append(pair["sae_per_position"])
                rec["sae_uncentred"].append(sparsity_of(diff[j], center=None))
                if baseline:
                    c = diff[first_channel + j]
                    pair.update(channel_index=int(chans[j]), channel=sparsity_of(c), channel_per_position=sparsity_per_position(c))
                    rec["channel"].append(pair["channel"])
                    rec["channel_per_position"].append(pair["channel_per_position"])
                    rec["channel_uncentred"].append(sparsity_of(c, center=None))
                rec["context"].append(n)
                pairs.append(pair)

    ctx = np.asarray(rec["context"])
    details = {
        "pairs": len(pairs), "contexts": int(N), "contexts_without_pairs": skipped, "context_length": int(L),
        "window": window, "positions": len({(p["context"], p["position"]) for p in pairs}),
        "sae_uncentred": mean_ci(rec["sae_uncentred"], ctx, seed=seed),
        "no_effect_pairs": int(np.sum(~np.isfinite(np.asarray(rec["sae"], dtype=float)))),
        "noise_floor": floor, "kv_cache": runner.use_cache, "lm_tokens": runner.tokens,
        "model_dtype": str(next(model.parameters()).dtype), "exclude_bos": exclude_bos,
        "interval": "95% percentile bootstrap over contexts", "sample": pairs,
    }
    metrics = {}
    for suffix, key in (("", "sae"), ("_per_position", "sae_per_position")):
        iv = mean_ci(rec[key], ctx, seed=seed)
        details[key] = iv
        metrics.update({f"eval/ablation_sparsity{suffix}": iv["mean"], f"eval/ablation_sparsity{suffix}_ci_lo": iv["lo"],
                        f"eval/ablation_sparsity{suffix}_ci_hi": iv["hi"]})
        if not baseline:
            continue
        ch_key = key.replace("sae", "channel")
        ch = mean_ci(rec[ch_key], ctx, seed=seed)
        a, c = np.asarray(rec[key], dtype=float), np.asarray(rec[ch_key], dtype=float)
        both = np.isfinite(a) & np.isfinite(c)
        lo, hi = bootstrap_ci(lambda x, y: float(np.mean(x - y)), a[both], c[both], clusters=ctx[both], seed=seed)
        diff = {"mean": float(np.mean(a[both] - c[both])) if both.any() else float("nan"), "lo": lo, "hi": hi,
                "n": int(both.sum())}
        details[ch_key.replace("channel", "channels")] = ch
        details[f"sae_minus_channels{suffix}"] = diff
        metrics.update({f"eval/ablation_sparsity{suffix}_residual": ch["mean"],
                        f"eval/ablation_sparsity{suffix}_residual_ci_lo": ch["lo"],
                        f"eval/ablation_sparsity{suffix}_residual_ci_hi": ch["hi"],
                        f"eval/ablation_sparsity{suffix}_diff": diff["mean"], f"eval/ablation_sparsity{suffix}_diff_ci_lo": lo,
                        f"eval/ablation_sparsity{suffix}_diff_ci_hi": hi})
    if baseline:
        details["channels_uncentred"] = mean_ci(rec["channel_uncentred"], ctx, seed=seed)
    return EvalResult(metrics, details)
