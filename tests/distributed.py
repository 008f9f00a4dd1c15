"""Running a function in N local processes with a gloo process group, for the multi-process
tests. Each process gets the environment torchrun would set (so Lightning takes it as an
externally launched rank), a free loopback port, and one thread; a failure in any process
fails the caller with that process's traceback."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, init_group: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), NODE_RANK="0", GROUP_RANK="0")
    torch.set_num_threads(1)
    if init_group:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(fn, world: int, *args, init_group: bool = True) -> None:
    """fn(rank, world, *args) in ``world`` processes; ``init_group=False`` leaves the process
    group to the function (Lightning's strategies create their own)."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args, init_group), nprocs=world, start_method="spawn")
