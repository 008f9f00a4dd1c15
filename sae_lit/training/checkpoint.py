"""Lightning checkpoints written atomically and read without running pickled code.

Lightning's TorchCheckpointIO serialises to memory first but then writes the final file in
place: a full disk or a kill mid-write leaves a truncated checkpoint under its final name
(last.ckpt included), which a resume then fails to read. AtomicCheckpointIO writes through
sae_lit.common.atomic_path (temporary name, fsync, rename), so the name always holds a
complete checkpoint - the new one or the previous one.
"""
from __future__ import annotations

import errno
import io
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from sae_lit.common import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # object stores: fsspec's transaction
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)  # in memory first: a failed write is then a plain OSError
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(buf.getbuffer())
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise OSError(
                e.errno, f"No space left on the device while saving checkpoint {path}; the checkpoints already there "
                f"are intact. Free some space and resume with --ckpt_path (e.g. the last.ckpt next to it)",
            ) from e

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        # Explicitly True: a checkpoint is data, and torch's default has changed across versions.
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


def use_atomic_checkpoints(trainer) -> None:
    """Give a Trainer AtomicCheckpointIO unless it was configured with its own CheckpointIO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
