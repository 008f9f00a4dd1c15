"""The command line: `python main.py fit|validate|test --config configs/quickstart.yaml`.

A LightningCLI over SAEModule and any LightningDataModule; d_in comes from the data.
"""
from __future__ import annotations

import jsonargparse
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from sae_lit.training.console import StepProgressBar, quiet_third_party
from sae_lit.training.module import SAEModule


class SAECLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Our progress bar (steps out of max_steps, tokens/s) unless the run has none or its own.
        has_bar = any(isinstance(c, ProgressBar) for c in (config.get("callbacks") or []) + callbacks)
        if config.get("enable_progress_bar") is not False and not has_bar:
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        # The data module knows the activation width (from its cache manifest or the subject
        # model's config) once it is built; the SAE is built after it.
        parser.link_arguments("data", "model.sae.d_in", compute_fn=lambda dm: dm.d_in, apply_on="instantiate")


def cli_main(args=None, run: bool = True) -> SAECLI:
    # The config dataclasses (SAEConfig, CacheConfig) document each field in a docstring
    # under it; this shows those in --help and --print_config=comments.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    quiet_third_party()
    return SAECLI(
        SAEModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # The module prints a one-line summary of the SAE instead of Lightning's table.
        trainer_defaults={"enable_model_summary": False},
        args=args,
        run=run,
    )
