"""Exporting a latent-sharded SAE as one SAELens folder (formats.py's layout), a shard at a
time: the writer never holds more than one shard's rows.

The weights file is laid out up front (safetensors: a JSON header with every tensor's shape
and byte range, then the raw data), memory-mapped, and each shard's rows are written into
their place: rows [lo, hi) of W_dec and b_enc, columns [lo, hi) of W_enc ([d_in, d_sae] in
SAELens). Under a live process group (``export_sharded``) the shards send their rows to shard
0, which writes; from a checkpoint folder (sae_lit.training.export) the shard files are read
one after another.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from sae_lit.common import commit, discard, temp_name, write_json_atomic
from sae_lit.model.formats import CFG_NAME, WEIGHTS_NAME, export_cfg
from sae_lit.model.formats.parts import refuse_non_finite
from sae_lit.model.formats.saelens import write_sparsity


class SafetensorsStream:
    """A float32 safetensors file of known shapes, written in place through a memory map."""

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]]):
        header, offset = {}, 0
        for name in sorted(shapes):  # the order safetensors itself writes float32 tensors in
            size = 4 * int(np.prod(shapes[name], dtype=np.int64))
            header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)
        self._map = np.memmap(self.path, dtype=np.float32, mode="r+", offset=8 + len(raw), shape=(offset // 4,))
        self.tensors = {
            name: self._map[h["data_offsets"][0] // 4 : h["data_offsets"][1] // 4].reshape(shapes[name])
            for name, h in header.items()
        }

    def close(self) -> None:
        self._map.flush()
        self.tensors.clear()
        del self._map


def export_rows(sae) -> tuple[Tensor, Tensor, Tensor]:
    """A (sharded) TopK SAE's rows as formats.export_sae writes them: (W_enc rows,
    b_enc / s, W_dec rows), float32, on the SAE's device."""
    s = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    return (sae.W_enc.detach().float().contiguous(), (sae.b_enc.detach().float() / s).contiguous(),
            sae.W_dec.detach().float().contiguous())


class ShardedExport:
    """An SAE folder filled shard by shard: ``add`` each shard's export_rows (and its latents'
    firing densities, when known), then ``close`` with b_dec. ``sae`` (any shard, or the whole
    SAE) gives the config and cfg.json."""

    def __init__(self, sae, out_dir: str | Path, metadata: dict | None = None):
        if sae.activation != "topk":
            raise ValueError(f"sharded export writes TopK SAEs only, got activation {sae.activation!r}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = export_cfg(sae, metadata)
        self.scale = self.cfg["sae_lit"]["folded_input_scale"]
        n, d = sae.num_latents, sae.d_in
        self._tmp = temp_name(self.out / WEIGHTS_NAME)
        self._file = SafetensorsStream(self._tmp, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)})
        self._rows = np.zeros(n, dtype=bool)
        self._density: Tensor | None = torch.full((n,), float("nan"), dtype=torch.float64)

    def add(self, lo: int, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, density: Tensor | None = None) -> None:
        refuse_non_finite({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec}, self.out, self.scale)
        hi = lo + W_dec.shape[0]
        t = self._file.tensors
        t["W_enc"][:, lo:hi] = W_enc.cpu().numpy().T
        t["b_enc"][lo:hi] = b_enc.cpu().numpy()
        t["W_dec"][lo:hi] = W_dec.cpu().numpy()
        self._rows[lo:hi] = True
        if density is None:
            self._density = None  # one shard without densities: the folder has none
        elif self._density is not None:
            self._density[lo:hi] = density.detach().double().cpu()

    def close(self, b_dec: Tensor) -> Path:
        """Write b_dec (the training space's; folded here) and put the folder in place."""
        try:
            if not self._rows.all():
                raise RuntimeError(f"sharded export: latents {np.flatnonzero(~self._rows)[:5].tolist()}... never written")
            self._file.tensors["b_dec"][:] = (b_dec.detach().float() / self.scale).cpu().numpy()
            self._file.close()
            commit(self._tmp, self.out / WEIGHTS_NAME)
        except BaseException:
            discard(self._tmp)
            raise
        if self._density is not None:
            write_sparsity(self.out, self._density)
        write_json_atomic(self.out / CFG_NAME, self.cfg)  # last: cfg.json marks a complete folder
        return self.out


def export_sharded(sae, out_dir: str | Path, metadata: dict | None = None,
                   density: Tensor | None = None) -> Path | None:
    """Export a ShardedTopKSAE from its live process group: a collective over the latent
    shards. Shard 0 writes and returns the folder; the others send their rows (and their
    latents' firing densities, if given: all shards or none) to it, one shard at a time, and
    return None."""
    comm = sae.comm
    rows = export_rows(sae)
    if density is not None:
        rows = (*rows, density.detach().float().to(rows[0].device).contiguous())
    if comm.size == 1:
        writer = ShardedExport(sae, out_dir, metadata)
        writer.add(sae.lo, *rows)
        return writer.close(sae.b_dec)
    root = dist.get_global_rank(comm.group, 0)
    out = None
    if comm.rank == 0:
        writer = ShardedExport(sae, out_dir, metadata)
        writer.add(sae.lo, *rows)
        for shard in range(1, comm.size):
            src = dist.get_global_rank(comm.group, shard)
            parts = [torch.empty_like(t) for t in rows]
            for t in parts:
                dist.recv(t, src=src, group=comm.group)
            writer.add(shard * sae.num_local, *parts)
            del parts
        out = writer.close(sae.b_dec)
    else:
        for t in rows:
            dist.send(t, dst=root, group=comm.group)
    dist.barrier(group=comm.group)  # the folder is complete when any shard returns
    return out
