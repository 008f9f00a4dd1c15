"""The paper's evaluation suite (Gao et al. 2024), independent of Lightning. Every eval takes
any SAE with ``encode(x) -> (values, indices)`` and ``decode(values, indices)``:

    downstream_loss        eval/delta_ce, eval/kl, eval/ce_recovered
    probe_eval             eval/probe_loss (+ eval/probe_loss_residual baseline)
    n2g_eval               eval/n2g_precision, eval/n2g_recall (+ eval/n2g_f1)
    ablation_sparsity      eval/ablation_sparsity (+ eval/ablation_sparsity_residual baseline)
    shrinkage              eval/shrinkage
    progressive_recovery   NMSE at k/4..4k and with a JumpReLU threshold (+ plot)

``run_suite`` runs them all on an ``EvalData`` within ``EvalConfig`` budgets.
"""
from sae_lit.evals.ablation import ablation_sparsity
from sae_lit.evals.downstream import downstream_loss
from sae_lit.evals.n2g import n2g_eval
from sae_lit.evals.probes import probe_eval
from sae_lit.evals.progressive import progressive_recovery
from sae_lit.evals.result import EvalResult
from sae_lit.evals.shrinkage import shrinkage
from sae_lit.evals.suite import EvalConfig, EvalData, data_from_datamodule, run_suite

__all__ = [
    "EvalConfig", "EvalData", "EvalResult", "ablation_sparsity", "data_from_datamodule", "downstream_loss",
    "n2g_eval", "probe_eval", "progressive_recovery", "run_suite", "shrinkage",
]
