"""SAE files in and out: ``load_sae`` reads every format sae_lit knows (SAELens v6 and pre-6,
sparsify, openai/sparse_autoencoder, dictionary_learning; local or on the hub; live objects)
into our TopKSAE; ``export_sae`` writes ours as SAELens or sparsify.

    saelens.py              the SAELens layout, read and written (also our default export)
    sparsify.py             EleutherAI sparsify, read and written
    openai.py               openai/sparse_autoencoder state dicts, read
    dictionary_learning.py  saprmarks/dictionary_learning TopK / BatchTopK, read
    hub.py                  hf://owner/repo[/subfolder] sources
    load.py                 format detection, load_sae, live objects
    parts.py                what the readers produce and how it becomes a TopKSAE (exact folds)

A Lightning checkpoint becomes a folder with `python -m sae_lit.training.export CKPT OUT_DIR
[--format saelens|sparsify]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor

from sae_lit.model.formats import saelens, sparsify
from sae_lit.model.formats.load import detect, load_sae, object_kind, parts_of_object
from sae_lit.model.formats.parts import FormatError, refuse_non_finite
from sae_lit.model.sae import TopKSAE

ExportFormat = Literal["saelens", "sparsify"]


def export_sae(sae: TopKSAE, out_dir: str | Path, metadata: dict | None = None, format: ExportFormat = "saelens",
               density: Tensor | None = None) -> Path:
    """Write ``sae`` (taking raw activations: the dataset constant folded in) to ``out_dir``.

    Args:
        metadata: SAELens ``metadata`` (model_name, hook_name, hf_hook_name, context_size, ...).
        format: "saelens" (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]) or
            "sparsify" (cfg.json + sae.safetensors; TopK SAEs without layer norm only).
        density: each latent's firing frequency (SAELens layout: written as sparsity.safetensors).
    """
    out = Path(out_dir)
    scale = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    refuse_non_finite(dict(sae.named_parameters()), out, scale)
    if format == "saelens":
        return saelens.write(sae, out, metadata, density)
    if format == "sparsify":
        return sparsify.write(sae, out, metadata)
    raise ValueError(f"format must be 'saelens' or 'sparsify', got {format!r}")


export_cfg = saelens.config
CFG_NAME, WEIGHTS_NAME = saelens.CFG_NAME, saelens.WEIGHTS_NAME

__all__ = ["CFG_NAME", "WEIGHTS_NAME", "ExportFormat", "FormatError", "detect", "export_cfg", "export_sae", "load_sae",
           "object_kind", "parts_of_object"]
