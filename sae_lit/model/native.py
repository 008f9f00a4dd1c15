"""Optional native CPU kernels for the selections of the TopK training step.

``torch.topk`` on CPU costs a third of the encoder GEMM at the paper's shapes (k = 32 of
n = 16k latents per token), and AuxK's top-k_aux of the dead latents' columns needs a
gather of those columns plus a second top-k. The kernels in ``csrc/select.cpp`` do both in
one pass over each row (see the file for how). They are compiled once per machine with
the system C++ compiler into a cache folder and loaded with ctypes; no build step at
install time, and without a compiler (or with ``SAE_LIT_NATIVE=0``) every caller falls
back to plain torch ops, with the same results.

Environment:
    SAE_LIT_NATIVE=0      never build or use the native kernels
    SAE_LIT_CACHE=DIR     where the compiled library goes (default ~/.cache/sae_lit)
    CXX=...               the compiler (default: g++, c++ or clang++ on PATH)
    SAE_LIT_NATIVE_FLAGS  target flags (default -march=native; e.g. "-mavx2 -mfma")
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SRC = Path(__file__).parent / "csrc" / "select.cpp"
_ABI = 6
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
build_error: str | None = None
"""Why the native kernels are unavailable (None when they are, or were not tried yet)."""


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("SAE_LIT_CACHE") or Path.home() / ".cache" / "sae_lit")


def _arch_flags() -> list[str]:
    return os.environ.get("SAE_LIT_NATIVE_FLAGS", "-march=native").split()


def _compile(cxx: str, out: Path) -> None:
    base = ["-O3", "-shared", "-fPIC", "-std=c++17", "-pthread", "-fopenmp-simd"]
    fd, name = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        errors = []
        # -march=native vectorises the scans for this CPU; some toolchains lack it.
        for extra in (_arch_flags(), []):
            proc = subprocess.run([cxx, *base, *extra, "-o", str(tmp), str(_SRC)], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent ranks may build at once
                return
            errors.append(proc.stderr.strip()[-2000:])
        raise RuntimeError(f"{cxx} failed to compile {_SRC}:\n" + "\n".join(errors))
    finally:
        tmp.unlink(missing_ok=True)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, build_error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SAE_LIT_NATIVE", "1") == "0":
            build_error = "disabled by SAE_LIT_NATIVE=0"
            return None
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if not cxx:
            build_error = "no C++ compiler on PATH (set CXX)"
            warnings.warn(f"sae_lit: native CPU kernels unavailable ({build_error}); using torch.topk, which is slower")
            return None
        ident = "\n".join([cxx, *_arch_flags(), _cpu_identity()])
        key = hashlib.sha256(_SRC.read_bytes() + ident.encode()).hexdigest()[:16]
        path = _cache_dir() / f"select-{key}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _compile(cxx, path)
            lib = ctypes.CDLL(str(path))
            if lib.sae_lit_abi_version() != _ABI:
                raise RuntimeError(f"{path} has ABI {lib.sae_lit_abi_version()}, expected {_ABI}; delete it")
        except (OSError, RuntimeError) as e:
            build_error = str(e)
            warnings.warn(f"sae_lit: native CPU kernels unavailable, using torch ops instead: {e}")
            return None
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        for fn in (lib.topk_f32, lib.topk_bf16):
            fn.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, cint]
            fn.restype = None
        for fn in (lib.aux_select_f32, lib.aux_select_bf16):
            fn.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, cint]
            fn.restype = None
        lib.gather_dot_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, cint]
        lib.gather_dot_f32.restype = None
        lib.mask_nonpositive_f32.argtypes = [ptr, ptr, i64, cint]
        lib.mask_nonpositive_f32.restype = None
        lib.project_rows_f32.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, cint]
        lib.project_rows_f32.restype = None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on first call)."""
    return _load() is not None


def _rows_ok(x: Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.stride(1) == 1
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def _f32_cpu(*ts: Tensor) -> bool:
    """All contiguous float32 CPU tensors outside autograd: what the elementwise kernels take."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        and not (t.requires_grad and torch.is_grad_enabled()) for t in ts
    )


def _fn(lib: ctypes.CDLL, name: str, x: Tensor):
    return getattr(lib, f"{name}_{'f32' if x.dtype == torch.float32 else 'bf16'}")


def _bias_ok(bias: Tensor | None, n: int) -> bool:
    return bias is None or (
        bias.device.type == "cpu" and bias.dtype == torch.float32 and bias.shape == (n,) and bias.is_contiguous()
    )


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def topk(x: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of ``x + bias``, sorted descending.

    Same contract as ``(x + bias).topk(k, dim=-1)`` (NaN ranks highest; ties may pick a
    different column). Native for float32 and bfloat16 CPU rows when k is small against the
    row (values then in float32: a bf16 row plus a float32 bias is not rounded back to
    bf16); torch otherwise. ``bias`` is float32.
    """
    rows, n = x.shape[0], x.shape[-1]
    lib = _load() if x.dim() == 2 and 0 < k and k * 8 <= n else None
    if lib is None or not _rows_ok(x) or not _bias_ok(bias, n):
        return (x if bias is None else x + bias).topk(k, dim=-1)
    values = torch.empty(rows, k, dtype=torch.float32)
    indices = torch.empty(rows, k, dtype=torch.int64)
    _fn(lib, "topk", x)(x.data_ptr(), _ptr(bias), rows, n, x.stride(0), k, values.data_ptr(), indices.data_ptr(),
                        torch.get_num_threads())
    return values, indices


def aux_select(pre: Tensor, cols: Tensor | None, k_aux: int, *, dense: bool, bias: Tensor | None = None
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """AuxK's selection among the columns ``cols`` of ``pre + bias`` ([B, n]; None: all columns).

    Returns (z, values, local): with ``dense`` the [B, n_cols] block holding ReLU of each
    row's top-k_aux entries (zero elsewhere) and values = local = None; otherwise
    values [B, k_aux] and their positions ``local`` in ``cols``, and z = None. Native for
    float32 and bfloat16 CPU rows (z and values then in float32); ``bias`` is float32.
    """
    n_cols = pre.shape[1] if cols is None else cols.numel()
    k_aux = min(k_aux, n_cols)
    lib = _load()
    if lib is None or not _rows_ok(pre) or not _bias_ok(bias, pre.shape[1]) or (
        cols is not None and cols.device.type != "cpu"
    ):
        sub = pre if cols is None else pre.index_select(1, cols)
        if bias is not None:
            sub = sub + (bias if cols is None else bias[cols])
        v, local = sub.topk(k_aux, dim=-1, sorted=False)
        if not dense:
            return None, v, local
        return torch.zeros_like(sub).scatter_(1, local, v.relu()), None, None
    B = pre.shape[0]
    cols_c = None if cols is None else cols.to(torch.int64).contiguous()
    args = (pre.data_ptr(), _ptr(bias), B, pre.stride(0), _ptr(cols_c), n_cols, k_aux)
    nt = torch.get_num_threads()
    fn = _fn(lib, "aux_select", pre)
    if dense:
        z = torch.empty(B, n_cols, dtype=torch.float32)
        fn(*args, z.data_ptr(), None, None, nt)
        return z, None, None
    v = torch.empty(B, k_aux, dtype=torch.float32)
    local = torch.empty(B, k_aux, dtype=torch.int64)
    fn(*args, None, v.data_ptr(), local.data_ptr(), nt)
    return None, v, local


def gather_dot(indices: Tensor, rows: Tensor, y: Tensor) -> Tensor | None:
    """[B, k]: <rows[indices[b, j]], y[b]>, or None where the native kernel does not apply
    (it needs float32 CPU tensors; rows and y contiguous)."""
    if not (_f32_cpu(rows, y) and indices.device.type == "cpu" and indices.dtype == torch.int64
            and indices.dim() == 2 and rows.shape[1] == y.shape[1]):
        return None
    lib = _load()
    if lib is None:
        return None
    idx = indices.contiguous()
    B, k = idx.shape
    out = torch.empty(B, k, dtype=torch.float32)
    lib.gather_dot_f32(idx.data_ptr(), rows.data_ptr(), y.data_ptr(), B, k, y.shape[1], out.data_ptr(),
                       torch.get_num_threads())
    return out


def mask_nonpositive_(g: Tensor, z: Tensor) -> Tensor:
    """In place: g = 0 where z <= 0 (z a ReLU'd block, so its zeros are the unselected
    entries), g elsewhere. NaN in z keeps g's entry zeroed."""
    lib = _load()
    if lib is None or not _f32_cpu(g, z) or g.shape != z.shape:
        return g.masked_fill_(~(z > 0), 0.0)
    lib.mask_nonpositive_f32(g.data_ptr(), z.data_ptr(), g.numel(), torch.get_num_threads())
    return g


def project_rows_(g: Tensor, w: Tensor) -> Tensor:
    """In place: g[r] -= (<g[r], w[r]> / <w[r], w[r]>) w[r] (denominator clamped at eps)."""
    eps = torch.finfo(w.dtype).eps
    lib = _load()
    if lib is None or not _f32_cpu(g, w) or g.dim() != 2 or g.shape != w.shape:
        sq = torch.linalg.vecdot(w, w).clamp_min(eps)
        parallel = torch.linalg.vecdot(g, w) / sq
        return g.addcmul_(parallel.unsqueeze(1), w, value=-1.0)
    lib.project_rows_f32(g.data_ptr(), w.data_ptr(), g.shape[0], g.shape[1], eps, torch.get_num_threads())
    return g


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks for reuse instead of returning them to the OS.

    A CPU training step allocates several [num_latents, d_in] and [B, n_dead] tensors and
    frees them again; above glibc's mmap threshold (at most 32 MiB) every one of them is
    a fresh mapping whose pages fault in on first touch, ~15% of the step at the paper's
    shapes. Raising the mmap and trim thresholds makes those allocations reuse the heap.
    Process-wide; peak memory is unchanged, but it stays mapped. Returns whether it was
    applied (glibc Linux only; set SAE_LIT_KEEP_FREED_MEMORY=0 to skip).
    """
    if os.environ.get("SAE_LIT_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
