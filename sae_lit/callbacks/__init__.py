from sae_lit.callbacks.evals import (
    AblationSparsityEval,
    DownstreamEval,
    EvalSuite,
    N2GEval,
    ProbeEval,
    ProgressiveEval,
    ShrinkageEval,
)

__all__ = ["EvalSuite", "DownstreamEval", "ProbeEval", "N2GEval", "AblationSparsityEval", "ShrinkageEval", "ProgressiveEval"]
