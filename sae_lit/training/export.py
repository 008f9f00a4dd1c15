"""A Lightning checkpoint of an SAEModule -> an SAE folder (sae_lit.model.formats).

    python -m sae_lit.training.export CKPT OUT_DIR
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jsonargparse import CLI, ArgumentParser

from sae_lit.common import one_line_errors, run_cli
from sae_lit.model.formats import export_sae
from sae_lit.training.module import SAEModule


def export_checkpoint(ckpt: str, out: str) -> Path:
    """Export the SAE of a Lightning checkpoint (its EMA weights when it keeps them).

    Args:
        ckpt: Lightning checkpoint (.ckpt) of an SAEModule.
        out: output folder (SAELens layout).
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist.")
    # weights_only: a checkpoint is data; no pickled code runs while reading it.
    module = SAEModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    path = export_sae(module.eval_sae, out, metadata=module.export_metadata)
    print(f"Exported {ckpt} -> {path}")
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    return CLI(export_checkpoint, args=argv, as_positional=True, parser_class=one_line_errors(ArgumentParser))


if __name__ == "__main__":
    run_cli(main)
