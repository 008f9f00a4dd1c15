"""The command line: `python main.py fit|validate|test --config configs/quickstart.yaml`.

A LightningCLI over SAEModule and any LightningDataModule; d_in comes from the data.
Mistakes print one line (`error: ...`); `--debug` shows the traceback. Checkpoints are
written atomically; resuming with model arguments other than the checkpoint's is an error
naming them (sae_lit.training.resume).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jsonargparse
import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sae_lit.common import one_line_errors, run_cli
from sae_lit.training.checkpoint import use_atomic_checkpoints
from sae_lit.training.console import StepProgressBar, quiet_third_party
from sae_lit.training.module import SAEModule
from sae_lit.training.resume import ResumeMismatchError, changes, flatten, mismatch_message, split_changes

# Lightning's special ckpt_path values (not files).
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


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

    def parse_arguments(self, parser, args) -> None:
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI parses the checkpoint's hyperparameters over the model config, so a flag
        such as --model.sae.num_latents would silently lose to the checkpoint. Keep that for
        the keys the user left alone; refuse the ones they set to something else."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or ckpt in _CKPT_KEYWORDS or ckpt.startswith("registry:"):
            return super()._parse_ckpt_path()
        if "://" not in ckpt and not Path(ckpt).is_file():
            raise FileNotFoundError(
                f"ckpt_path {ckpt!r} does not exist (a .ckpt file, e.g. <log_dir>/checkpoints/last.ckpt)."
            )
        asked = flatten(self.config[sub].model.clone().as_dict())
        defaults = flatten(self._parser(sub).get_defaults().get("model").as_dict())
        given = {
            a.split("=", 1)[0][len("--model."):].replace("init_args.", "") for a in self._argv if a.startswith("--model.")
        }
        explicit = {k for k, v in asked.items() if k in given or v != defaults.get(k)} - {"sae.d_in"}  # d_in: linked
        super()._parse_ckpt_path()
        model = self.config[sub].model
        diff = changes(flatten(model.as_dict()), asked, explicit)
        for key, (_, value) in diff.items():
            model[key] = value  # the user's value; SAEModule.on_load_checkpoint applies (lr) or refuses
        _, unsafe = split_changes(diff)
        if unsafe:
            raise ResumeMismatchError(mismatch_message(unsafe, ckpt, prefix="model."))

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


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
        parser_class=one_line_errors(LightningArgumentParser),
        args=args,
        run=run,
    )


def main(argv=None) -> SAECLI:
    """`python main.py ...`: cli_main with one-line errors (`--debug` for the traceback)."""
    return run_cli(cli_main, argv)
