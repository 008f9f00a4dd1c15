"""Small helpers every stage uses: atomic writes, number formatting, figures, batch unpacking.

One copy each; this module imports nothing else of sae_lit, so any stage may use it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


def temp_name(path: str | os.PathLike) -> Path:
    """The hidden temporary name a file is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def commit(tmp: Path, path: str | os.PathLike, fsync: bool = True) -> Path:
    """Sync ``tmp`` to disk and rename it onto ``path`` (atomic on POSIX filesystems)."""
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    return Path(path)


def discard(tmp: Path) -> None:
    """Remove a temporary file; never raises (it runs on error paths, over the first error)."""
    try:
        Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is synced and renamed onto
    ``path``, on error removed. A file under its final name is therefore always complete: a
    crash or a full disk leaves at most a hidden ``.NAME.tmp<pid>`` (never the final name)."""
    tmp = temp_name(path)
    try:
        yield tmp
        commit(tmp, path, fsync)
    except BaseException:
        discard(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def fmt(x, digits: int = 4) -> str:
    """A number for a table or a page: ``digits`` significant digits, integers as they are,
    "–" for None / NaN / inf."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(x)
    return f"{float(x):.{digits}g}"


def log_axes(title: str | None = None, xlabel: str | None = None, ylabel: str | None = None, *,
             logx: bool = True, logy: bool = True, size: tuple[float, float] = (6, 4.5)):
    """(figure, axes) for a report plot: a bare matplotlib Figure (no pyplot, so no global
    state or GUI backend; savefig renders with Agg), log-log with a light grid by default."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    ax.set(xscale="log" if logx else "linear", yscale="log" if logy else "linear")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return fig, ax


def save_figure(fig, path: str | os.PathLike, dpi: int = 110, tb_writer=None, tag: str | None = None,
                step: int = 0) -> Path:
    """Write a figure as PNG atomically (its folder created if needed) and, given a
    TensorBoard SummaryWriter, log it with ``add_figure`` under ``tag`` (default: the stem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    if tb_writer is not None:
        tb_writer.add_figure(tag or path.stem, fig, global_step=step, close=False)
    return path


def acts_of(batch, float32: bool = True):
    """The activations of a batch: a tensor, or a dict / tuple whose first item is one; as
    float32 when stored in half precision (float16 / bfloat16), unless ``float32`` is False."""
    import torch

    if isinstance(batch, dict):
        batch = batch["acts"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return batch.float() if float32 and batch.dtype in (torch.float16, torch.bfloat16) else batch


@functools.lru_cache(maxsize=None)
def bf16_speedup(m: int, k: int, n: int, reps: int = 3) -> float:
    """fp32 time / bf16 time of a [m, k] x [k, n] CPU matmul, measured here (best of ``reps``).

    CPUs with AMX or AVX512-BF16 run bf16 GEMMs several times faster than fp32; others emulate
    bf16 and run it several times slower. Measuring beats guessing from CPU flags."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = a.to(dtype), b.to(dtype)
        torch.mm(x, w)  # warm-up: first calls pick kernels
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(x, w)
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-12)


def data_rank(trainer) -> tuple[int, int]:
    """(rank, number) of the data-parallel share a process reads: its strategy's
    ``distributed_sampler_kwargs`` (under latent parallelism the ranks of one replica read
    the same batches), else the global rank and world size; (0, 1) without a trainer."""
    if trainer is None:
        return 0, 1
    kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    if kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return int(trainer.global_rank), int(trainer.world_size)
