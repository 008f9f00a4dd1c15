"""What a training run prints: a progress bar with a real total, and no messages a user cannot
act on. Third-party noise is filtered narrowly, by message, never by whole category."""
from __future__ import annotations

import logging
import time
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar

from sae_lit.common import acts_of

# Lightning's INFO lines that say nothing on a CPU-only run, and its advertising.
_QUIET_PREFIXES = ("💡 Tip:", "GPU available: False", "TPU available: False", "Seed set to")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_QUIET_PREFIXES)


def quiet_third_party() -> None:
    """Silence the known third-party messages a user cannot act on (idempotent)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    # Lightning's own use of a deprecated torch API (lightning/pytorch/utilities/_pytree.py).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Our training stream is endless and says so by its __len__; Lightning warns about that.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # The sweep and the eval runner build the CLI from Python with explicit args on purpose.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # `main.py test --ckpt_path` from another run's folder: the checkpoint callback's
    # best-k bookkeeping is not restored, which `test` never uses.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


class StepProgressBar(TQDMProgressBar):
    """Training progress in optimizer steps out of max_steps (epochs mean nothing on an endless
    stream), with tokens/s; validation as its own short bar."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._t0 = self._tokens = None

    def on_train_epoch_start(self, trainer, *_):
        super().on_train_epoch_start(trainer)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.unit = "step"
        self.train_progress_bar.set_description("training")
        self._t0, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += acts_of(batch, float32=False).shape[0]
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total):
            bar = self.train_progress_bar
            bar.n = n
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            metrics = self.get_metrics(trainer, pl_module)
            post = {"tok/s": f"{self._tokens / elapsed:,.0f}"}
            for key in ("train/nmse", "train/dead_frac"):
                if key in metrics:
                    post[key.split("/", 1)[1]] = metrics[key]
            bar.set_postfix(post, refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
