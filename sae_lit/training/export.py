"""A Lightning checkpoint of an SAEModule -> an SAE folder (sae_lit.model.formats).

    python -m sae_lit.training.export CKPT OUT_DIR [--format saelens|sparsify]
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jsonargparse import CLI

from sae_lit.model.formats import ExportFormat
from sae_lit.training.module import SAEModule


def export_checkpoint(ckpt: str, out: str, format: ExportFormat = "saelens") -> Path:
    """Export the SAE of a Lightning checkpoint (its EMA weights when it keeps them).

    Args:
        ckpt: Lightning checkpoint (.ckpt) of an SAEModule.
        out: output folder.
        format: "saelens" (cfg.json + sae_weights.safetensors + sparsity.safetensors) or
            "sparsify" (cfg.json + sae.safetensors; TopK SAEs without layer norm).
    """
    module = SAEModule.load_from_checkpoint(ckpt, map_location="cpu")
    path = module.export(out, format)
    print(f"Exported {ckpt} -> {path} ({format})")
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    return CLI(export_checkpoint, args=argv, as_positional=True)


if __name__ == "__main__":
    main()
