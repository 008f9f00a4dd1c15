"""Downstream loss: how much worse the LM predicts when the SAE's reconstruction replaces
the activation at the hookpoint (PAPER.md, "Metrics").

    eval/delta_ce     CE(spliced) - CE(clean), nats per token
    eval/kl           KL(clean || spliced) over the vocabulary, mean per token
    eval/ce_recovered (CE_zero - CE_spliced) / (CE_zero - CE_clean), CE_zero with the
                      hookpoint's output zeroed

All three are ratios or means of sums over every scored token of every context, never means
of per-batch means. With ``exclude_bos`` (default) the BOS position keeps its clean
activation and the prediction made at BOS is not scored: SAEs are trained without BOS (its
activation is an outlier with a huge norm on most models), and splicing it would measure
that choice rather than the SAE. Likewise, with ``outlier_threshold`` (the cache's, when the
SAE was trained without "massive activation" tokens) positions whose activation norm exceeds
it keep their clean activation in both the spliced and the zero-ablated run; they are still
scored, and how many there were is reported.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_lit.evals.adapter import as_adapter
from sae_lit.evals.lm import edit_hookpoint, logits, token_ce, token_kl
from sae_lit.evals.result import EvalResult


@torch.no_grad()
def downstream_loss(
    sae,
    model: nn.Module,
    hookpoint: str,
    contexts: Tensor,
    batch_size: int = 8,
    exclude_bos: bool = True,
    outlier_threshold: float | None = None,
) -> EvalResult:
    """``contexts`` [N, T] token ids, each starting with BOS (as the cache's blocks do)."""
    sae = as_adapter(sae)
    if contexts.dim() != 2 or contexts.shape[1] < 3:
        raise ValueError(f"contexts must be [N, T] with T >= 3, got shape {tuple(contexts.shape)}")
    start = 1 if exclude_bos else 0
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    n_tokens, n_outliers = 0, 0

    def edited(h: Tensor) -> Tensor:
        """Bool [B, T]: the positions the SAE (or the zero-ablation) replaces."""
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        mask[:, :start] = False
        if outlier_threshold is not None:
            mask &= h.float().norm(dim=-1) <= outlier_threshold
        return mask

    def splice(h: Tensor) -> Tensor:
        nonlocal n_outliers
        mask = edited(h)
        n_outliers += int(h.shape[0] * (h.shape[1] - start) - mask.sum())
        out = h.clone()
        out[mask] = sae.reconstruct(h[mask]).to(h.dtype)
        return out

    def zero(h: Tensor) -> Tensor:
        return h.masked_fill(edited(h)[..., None], 0)

    for lo in range(0, contexts.shape[0], batch_size):
        ids = contexts[lo : lo + batch_size]
        clean = logits(model, ids)
        with edit_hookpoint(model, hookpoint, splice):
            spliced = logits(model, ids)
        with edit_hookpoint(model, hookpoint, zero):
            zeroed = logits(model, ids)
        # Predictions made at positions start..T-2 (the last position has no target).
        sl = slice(start, None)
        sums["ce_clean"] += token_ce(clean, ids)[:, sl].double().sum().item()
        sums["ce_sae"] += token_ce(spliced, ids)[:, sl].double().sum().item()
        sums["ce_zero"] += token_ce(zeroed, ids)[:, sl].double().sum().item()
        sums["kl"] += token_kl(clean[:, start:-1], spliced[:, start:-1]).double().sum().item()
        sums["kl_zero"] += token_kl(clean[:, start:-1], zeroed[:, start:-1]).double().sum().item()
        n_tokens += ids.shape[0] * (ids.shape[1] - 1 - start)

    mean = {k: v / max(n_tokens, 1) for k, v in sums.items()}
    gap = mean["ce_zero"] - mean["ce_clean"]
    recovered = (mean["ce_zero"] - mean["ce_sae"]) / gap if gap != 0 else float("nan")
    metrics = {
        "eval/delta_ce": mean["ce_sae"] - mean["ce_clean"],
        "eval/kl": mean["kl"],
        "eval/ce_recovered": recovered,
    }
    details = {**mean, "tokens": n_tokens, "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
               "exclude_bos": exclude_bos, "outlier_threshold": outlier_threshold, "outlier_positions_kept_clean": n_outliers}
    return EvalResult(metrics, details)
