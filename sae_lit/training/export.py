"""A Lightning checkpoint of an SAEModule -> an SAE folder (sae_lit.model.formats).

    python -m sae_lit.training.export CKPT OUT_DIR [--format saelens|sparsify]

CKPT is a .ckpt file, or the folder a LatentParallelStrategy run saves (one file per latent
shard): that one is exported shard by shard (SAELens layout), never holding the whole SAE.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
from jsonargparse import CLI, ArgumentParser

from sae_lit.common import one_line_errors, run_cli
from sae_lit.model.formats import ExportFormat
from sae_lit.model.sae import SAEConfig
from sae_lit.model.sharded import LatentComm, ShardedTopKSAE
from sae_lit.model.sharded_io import ShardedExport, export_rows
from sae_lit.training.module import SAEModule
from sae_lit.training.strategies import read_index


def export_checkpoint(ckpt: str, out: str, format: ExportFormat = "saelens") -> Path:
    """Export the SAE of a Lightning checkpoint (its EMA weights when it keeps them).

    Args:
        ckpt: Lightning checkpoint (.ckpt) of an SAEModule, or a latent-parallel checkpoint folder.
        out: output folder.
        format: "saelens" (cfg.json + sae_weights.safetensors + sparsity.safetensors) or
            "sparsify" (cfg.json + sae.safetensors; TopK SAEs without layer norm). A
            latent-parallel checkpoint exports as SAELens.
    """
    index = read_index(ckpt)
    if index is not None:
        if format != "saelens":
            raise ValueError(f"{ckpt}: a latent-parallel checkpoint exports in the SAELens layout only, not {format!r}")
        path = export_sharded_checkpoint(ckpt, out, index)
    else:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt!r} does not exist.")
        # weights_only: a checkpoint is data; no pickled code runs while reading it.
        module = SAEModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        path = module.export(out, format)
    print(f"Exported {ckpt} -> {path} ({format})")
    return path


def shard_module(checkpoint: dict) -> SAEModule:
    """The SAEModule of one shard file of a latent-parallel checkpoint, on CPU, detached
    from any process group (it can export its rows, not run)."""
    names = inspect.signature(SAEModule).parameters  # the CLI adds keys of its own (_instantiator)
    hp = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in names}
    place = checkpoint["latent_parallel"]
    module = SAEModule(**{**hp, "defer_init": True})
    cfg = SAEConfig.from_dict(hp["sae"])
    n_local = cfg.num_latents // place["num_shards"]
    rows = (torch.empty(n_local, cfg.d_in), torch.empty(n_local, cfg.d_in))  # filled by the state dict
    module._attach(ShardedTopKSAE(cfg, LatentComm(None, place["shard"], place["num_shards"]), rows=rows))
    module.to(checkpoint["state_dict"]["sae.W_dec"].dtype)  # as trained: the EMA is divided in that dtype
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module


def export_sharded_checkpoint(folder: str | Path, out: str | Path, index: dict) -> Path:
    writer = None
    for name in index["files"]:
        checkpoint = torch.load(Path(folder) / name, map_location="cpu", weights_only=True)
        module = shard_module(checkpoint)
        sae = module.eval_sae
        info = module.export_info()
        if writer is None:
            writer = ShardedExport(sae, out, metadata=info["metadata"])
            b_dec = sae.b_dec.detach().clone()
        writer.add(sae.lo, *export_rows(sae), density=info["density"])
        del checkpoint, module, sae
    return writer.close(b_dec)


def main(argv: Sequence[str] | None = None) -> Path:
    return CLI(export_checkpoint, args=argv, as_positional=True, parser_class=one_line_errors(ArgumentParser))


if __name__ == "__main__":
    run_cli(main)
