"""Lightning callbacks that run the evaluation suite (sae_lit.evals) during validation and at
`python main.py test`. They are thin: pick the SAE (``pl_module.eval_sae``) and the data
(``trainer.datamodule``), call ``run_suite``, and log.

In a config:

    trainer:
      callbacks:
        - class_path: sae_lit.training.callbacks.EvalSuite
          init_args:
            every_n_validations: 5
            config: {evals: [downstream, probes], downstream_contexts: 16}

Results: TensorBoard scalars under the DESIGN.md names (eval/delta_ce, ...) at the global step,
figures as images, and ``<log_dir>/eval/report.json`` (merged across callbacks, the config used
included). Runs on global rank 0 only; the other ranks wait at the next collective.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sae_lit.evals.report import close_figures, log_tensorboard, write_report
from sae_lit.evals.suite import EvalConfig, data_from_datamodule, run_suite
from sae_lit.model.sae import TopKSAE
from sae_lit.training.module import SAEModule

log = logging.getLogger(__name__)


class EvalSuite(Callback):
    def __init__(self, every_n_validations: int = 1, run_on_test: bool = True, enabled: bool = True,
                 config: EvalConfig | None = None):
        """
        Args:
            every_n_validations: run after every n-th validation (sanity checks not counted); 0 = never during fit.
            run_on_test: run at the end of `trainer.test` (`python main.py test`).
            enabled: master switch (e.g. `--trainer.callbacks.init_args.enabled false`).
            config: which evals and their token budgets (sae_lit.evals.suite.EvalConfig).
        """
        super().__init__()
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations must be >= 0, got {every_n_validations}")
        self.every_n_validations, self.run_on_test, self.enabled = every_n_validations, run_on_test, enabled
        self.config = config or EvalConfig()
        self._validations = 0
        self.last_report: dict | None = None

    # ------------------------------------------------------------------ when
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or self.every_n_validations == 0:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._run(trainer, pl_module, "validation")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.run_on_test:
            self._run(trainer, pl_module, "test")

    # ------------------------------------------------------------------ what
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "sharded", False):
            # The evals read the whole SAE on one process; a latent shard cannot serve them.
            log.warning("%s: skipped, the SAE is latent-sharded; evaluate the export instead: "
                        "python -m sae_lit.evals --sae <log_dir>/sae --config ...", type(self).__name__)
            return
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if dm is None:
            log.warning("%s: no datamodule attached to the trainer; nothing to evaluate on.", type(self).__name__)
            return
        if not isinstance(pl_module, SAEModule):
            raise TypeError(f"{type(self).__name__} evaluates an SAEModule's SAE, got {type(pl_module).__name__}")
        sae = pl_module.eval_sae
        was_training = sae.training
        sae.eval()
        try:
            # Lightning runs validation hooks under inference_mode; the evals only need no_grad,
            # and tensors made under inference_mode cannot be reused by later training steps.
            with torch.inference_mode(False), torch.no_grad():
                data = data_from_datamodule(dm, self.config, device=pl_module.device)
                report, figures = run_suite(sae, data, self.config)
        finally:
            if was_training:
                sae.train()
        report.update(stage=stage, global_step=int(trainer.global_step), sae=_sae_summary(sae))
        self._log(trainer, report, figures)
        close_figures(figures)
        self.last_report = report

    def _log(self, trainer: L.Trainer, report: dict, figures: dict) -> None:
        metrics = report["metrics"]
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        step = int(trainer.global_step)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_scalar") and hasattr(exp, "add_figure"):
                log_tensorboard(exp, metrics, figures, step)
            else:
                logger.log_metrics({k: v for k, v in metrics.items() if v == v}, step=step)
        root = trainer.log_dir or trainer.default_root_dir
        path = write_report(report, figures, Path(root) / "eval")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"Evaluation ({report['stage']}, step {step}): {shown}\nReport: {path}")


def _sae_summary(sae: TopKSAE) -> dict:
    return dataclasses.asdict(sae.cfg)


# --- one eval each, for configs that want only some of them at their own cadence ---------------


class _SingleEval(EvalSuite):
    eval_name = ""

    def __init__(self, every_n_validations: int = 1, run_on_test: bool = True, enabled: bool = True,
                 config: EvalConfig | None = None):
        """Same arguments as EvalSuite; config.evals is set to this callback's eval."""
        config = config or EvalConfig()
        config.evals = [self.eval_name]
        super().__init__(every_n_validations, run_on_test, enabled, config)


class DownstreamEval(_SingleEval):
    """Delta CE, KL and CE recovered with the SAE spliced in."""

    eval_name = "downstream"


class ProbeEval(_SingleEval):
    """Probe loss over the built-in (and JSONL) tasks, with the residual-channel baseline."""

    eval_name = "probes"


class N2GEval(_SingleEval):
    """N-gram explanations and their held-out precision and recall."""

    eval_name = "n2g"


class AblationSparsityEval(_SingleEval):
    """Logit-effect sparsity of single latents, with the residual-channel baseline."""

    eval_name = "ablation"


class ShrinkageEval(_SingleEval):
    """NNLS refit of the latent values on a frozen support."""

    eval_name = "shrinkage"


class ProgressiveEval(_SingleEval):
    """NMSE at k/4 .. 4k and with a JumpReLU threshold, with its plot."""

    eval_name = "progressive"
