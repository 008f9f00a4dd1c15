"""LatentParallelStrategy: the SAE's latents split over the devices of a node, data parallel
across nodes (PAPER.md, "Scaling out"), on Lightning's ModelParallelStrategy.

The ranks form a 2-D device mesh, replicas x latent shards (rank = replica * shards + shard,
as in the reference code): the ranks of one replica split the latents between them
(sae_lit.model.sharded) and read the same batches; the replicas read disjoint data and
average their gradients. Launching (torchrun, SLURM, Lightning's own launcher for
``python main.py fit ...``) and the process groups are Lightning's and torch's; this class adds
the SAE's view of the mesh and the sharded checkpoint.

A checkpoint is a folder: one file per latent shard, written by that shard's rank of replica
0 (every replica holds the same weights and Adam moments), plus an index. Each file is what
Lightning would save for that rank (its rows, their Adam moments and dead counters, and the
replicated rest), so Lightning's own restore path loads it; any number of replicas can
resume from it, as long as the shard count is the same.
"""
from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.cloud_io import _load
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import Strategy

from sae_lit.common import write_json_atomic
from sae_lit.model.sharded import LatentComm

INDEX_NAME = "latent_parallel.json"
CHECKPOINT_KEY = "latent_parallel"
"""Key of each shard file's checkpoint dict that says which shard it holds."""


def shard_file(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.ckpt"


def read_index(path: str | Path) -> dict | None:
    """The index of a sharded checkpoint folder; None for anything else (e.g. a .ckpt file)."""
    index = Path(path) / INDEX_NAME
    if not index.is_file():
        return None
    return json.loads(index.read_text())


class LatentParallelStrategy(ModelParallelStrategy):
    def __init__(
        self,
        latent_shards: int | Literal["auto"] = "auto",
        replicas: int | Literal["auto"] = "auto",
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
    ):
        """
        Args:
            latent_shards: ranks that split the latents ("auto": the devices of one node).
                num_latents must be a multiple of it.
            replicas: data-parallel copies of the sharded SAE ("auto": the number of nodes).
                latent_shards x replicas = all ranks.
            process_group_backend: "nccl" on GPUs, "gloo" on CPUs (default: by device).
            timeout: of the collectives.
        """
        super().__init__(data_parallel_size=replicas, tensor_parallel_size=latent_shards,
                         save_distributed_checkpoint=True, process_group_backend=process_group_backend,
                         timeout=timeout)
        self._latent_comm: LatentComm | None = None

    # ------------------------------------------------------------------ the mesh, for the SAE
    @property
    def latent_comm(self) -> LatentComm:
        """The latent-shard group of this rank (the ranks of its replica)."""
        if self._latent_comm is None:
            mesh = self.device_mesh["tensor_parallel"]
            self._latent_comm = LatentComm(mesh.get_group(), mesh.get_local_rank(), mesh.size())
        return self._latent_comm

    @property
    def replica_group(self) -> torch.distributed.ProcessGroup:
        """The ranks holding the same latent shard, one per replica."""
        return self.device_mesh["data_parallel"].get_group()

    @property
    def num_replicas(self) -> int:
        return self.device_mesh["data_parallel"].size()

    @property
    def replica_rank(self) -> int:
        return self.device_mesh["data_parallel"].get_local_rank()

    # ------------------------------------------------------------------ state: plain per rank
    # ModelParallelStrategy reads and writes DTensor state through torch.distributed.checkpoint;
    # the SAE's shards are plain tensors, so each rank's state is simply its own.
    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return Strategy.lightning_module_state_dict(self)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """Each latent shard's rank of replica 0 writes its file into ``<filepath>.partial``;
        then rank 0 writes the index and puts the folder in place of ``filepath`` (a crash
        midway leaves the previous checkpoint whole). The folder must be on storage every
        rank sees."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        comm = self.latent_comm
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier("latent_parallel_save_start")
        if self.replica_rank == 0:
            checkpoint[CHECKPOINT_KEY] = {"shard": comm.rank, "num_shards": comm.size}
            torch.save(checkpoint, partial / shard_file(comm.rank, comm.size))
        self.barrier("latent_parallel_save_shards")
        if self.global_rank == 0:
            write_json_atomic(partial / INDEX_NAME, {
                "format_version": 1, "num_shards": comm.size, "replicas": self.num_replicas,
                "files": [shard_file(s, comm.size) for s in range(comm.size)],
            })
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("latent_parallel_save_end")

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        index = read_index(path)
        if index is None:
            raise FileNotFoundError(
                f"{path} is not a latent-parallel checkpoint (no {INDEX_NAME} in it): resume a LatentParallelStrategy "
                "run from a checkpoint folder it wrote"
            )
        comm = self.latent_comm
        if index["num_shards"] != comm.size:
            raise ValueError(
                f"{path} holds {index['num_shards']} latent shards but this run has latent_shards={comm.size}: resume "
                f"with latent_shards={index['num_shards']} (any number of replicas), or export it "
                "(python -m sae_lit.training.export) and start from the export"
            )
        checkpoint = _load(path / shard_file(comm.rank, comm.size), map_location="cpu", weights_only=weights_only)
        checkpoint.pop(CHECKPOINT_KEY, None)
        return checkpoint
