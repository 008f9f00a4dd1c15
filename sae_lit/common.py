"""Small helpers every stage uses: atomic writes, number formatting, figures, batch unpacking,
and how a command line reports a user's mistake.

One copy each; this module imports nothing else of sae_lit, so any stage may use it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
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


_TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``temp_name``) that killed writers left in ``folder``. Only
    where no other writer can be active (e.g. under the folder's build lock)."""
    stale = [p for p in Path(folder).iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        discard(p)
    return stale


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


# --- command lines: a user's mistake is one line, not a traceback ------------------------------

DEBUG_FLAG = "--debug"
_UNION_DUMP = "Does not validate against any of the Union subtypes"


def _debugging() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"


def run_cli(main, argv=None):
    """Run ``main(argv)`` as a command: a mistake (a bad value, a missing file, a wrong type, an
    unknown hookpoint, a damaged cache, a full disk) prints ``error: ...`` on one line to stderr
    and exits with status 1, without a traceback. ``--debug`` anywhere on the command line shows
    the traceback (and jsonargparse's full messages) instead."""
    debug = DEBUG_FLAG in (sys.argv if argv is None else argv)
    if argv is None:  # the real command line, which main reads from sys.argv itself
        sys.argv[:] = [a for a in sys.argv if a != DEBUG_FLAG]
    else:
        argv = [a for a in argv if a != DEBUG_FLAG]
    saved = os.environ.get("JSONARGPARSE_DEBUG")
    if debug:
        os.environ["JSONARGPARSE_DEBUG"] = "true"  # jsonargparse then raises its errors in full
    try:
        return main(argv)
    except Exception as e:
        if debug or _debugging():
            raise
        message = " ".join(error_message(e).split())  # one line, whatever the message's layout
        sys.stderr.write(f"error: {message} ({DEBUG_FLAG} shows the traceback)\n")
        raise SystemExit(1) from None
    finally:
        if debug:
            if saved is None:
                os.environ.pop("JSONARGPARSE_DEBUG", None)
            else:
                os.environ["JSONARGPARSE_DEBUG"] = saved


def error_message(e: BaseException) -> str:
    """What to tell the user about ``e``: the message of the error that caused it (jsonargparse
    wraps an error raised while building a class from the config in a dump of every type it
    tried), with its type name unless it is a plain value / file error."""
    while e.__cause__ is not None and (_UNION_DUMP in str(e) or type(e).__module__.startswith("jsonargparse")):
        e = e.__cause__
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    else:
        msg = str(e).strip() or type(e).__name__
    if _UNION_DUMP in msg or "Parser key" in msg:
        msg = summarize_parser_error(msg)
    if type(e) in (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError) or msg.startswith(type(e).__name__):
        return msg
    return f"{type(e).__name__}: {msg}"


_PARSER_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^\s*(?:- )?Problem with given class_path '([^']+)':\s*$")
_NOISE = re.compile(
    r"^\s*(?:- )?(?:Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value type:|"
    r"Given value:|Expected a <class 'NoneType'>|Expected a path but )"
)
_EXPECTED = re.compile(r"^Expected a (?:<class '([\w.]+)'>|typing\.Literal\[(.*)\]|(.+?))\. Got value: (.*)$")


def summarize_parser_error(message: str, argv=()) -> str:
    """One line out of a jsonargparse error: the full key (completed from the command line's
    ``--a.b.key`` when the message names only the innermost part), and the innermost reason."""
    keys, class_path, leaf = [], None, None
    for line in message.splitlines():
        if not line.strip():
            continue
        m = _PARSER_KEY.match(line)
        if m:
            keys.append(m.group(1))
            if m.group(2):
                leaf = m.group(2).strip()
                break
            continue
        m = _CLASS_PATH.match(line)
        if m:
            class_path = m.group(1)
            keys.append("init_args")
            continue
        if _NOISE.match(line):
            continue
        leaf = line.strip().removeprefix("- ")
        break
    if leaf is None:
        return message.strip().splitlines()[0]
    m = _EXPECTED.match(leaf)
    if m:
        kind, literal, other, got = m.groups()
        want = f"one of {literal}" if literal else (kind or other)
        leaf = f"expected {want}, got {got!r}"
    if keys and keys[-1] == "init_args":
        keys.pop()
        leaf = f"class_path {class_path!r}: {leaf}"
    key = ".".join(keys)
    for arg in argv:
        name = str(arg).split("=", 1)[0]
        if key and name.startswith("--") and (name[2:] == key or name.endswith("." + key)):
            key = name[2:]
            break
    return f"{key}: {leaf}" if key else leaf


def one_line_errors(parser_class):
    """A subclass of a jsonargparse ArgumentParser class whose parse errors print one line
    (the key, the value and what was expected, see ``summarize_parser_error``) instead of the
    usage text and the dump of every type tried; ``--debug`` (``run_cli``) restores those."""

    class OneLineErrors(parser_class):
        _argv: tuple = ()

        def parse_args(self, args=None, *a, **kw):
            self._argv = tuple(sys.argv[1:] if args is None else args)
            return super().parse_args(args, *a, **kw)

        def error(self, message, ex=None):
            if not self.exit_on_error or _debugging():
                return super().error(message, ex)
            argv = self._argv or tuple(sys.argv[1:])
            sys.stderr.write(f"error: {summarize_parser_error(message, argv)} (--help lists the options)\n")
            raise SystemExit(2)

    OneLineErrors.__name__ = OneLineErrors.__qualname__ = f"OneLineErrors{parser_class.__name__}"
    return OneLineErrors
