"""The native CPU selection kernels against torch, and the fallback when they cannot be built."""
import os
import subprocess
import sys

import pytest
import torch

from sae_lit.model import native
from sae_lit.model.sae import TopKSAE

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.build_error}")


@needs_native
@pytest.mark.parametrize("rows,n,k", [(7, 64, 1), (33, 1000, 8), (64, 4096, 32), (5, 16384, 128), (3, 200, 25)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_matches_torch(rows, n, k, with_bias):
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, n, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    v, i = native.topk(x, k, bias=bias)
    rv, ri = (x if bias is None else x + bias).topk(k, dim=-1)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)
    assert torch.equal(i, ri)


@needs_native
def test_topk_strided_rows_and_special_values():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 700, generator=g)
    x = base[:, :640]  # rows with a stride larger than their length
    assert native._rows_ok(x) and x.stride(0) == 700
    x[1, 5] = float("inf")
    x[2, 600] = float("-inf")
    x[3, 17] = float("nan")  # NaN ranks highest, as in torch.topk
    x[3, 300] = float("nan")
    v, i = native.topk(x, 8)
    rv, ri = x.topk(8, dim=-1)
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(i, ri)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_block_path_with_a_tail_and_special_values(dtype):
    # Rows of >= 2k blocks of 64 take the block-maximum path; 4100 leaves a 4-value tail.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 4100, generator=g)
    x[0, 4098] = 50.0  # the top value in the tail
    x[1, 7] = float("inf")
    x[2, 100] = float("-inf")
    x[3, 2000] = float("nan")
    x = x.to(dtype)
    bias = torch.randn(4100, generator=g) * 0.01
    v, i = native.topk(x, 16, bias=bias)
    y = x.float() + bias
    torch.testing.assert_close(v, y.topk(16, dim=-1).values, rtol=0, atol=0, equal_nan=True)
    ok = torch.arange(8) != 3
    assert torch.equal(y.gather(1, i)[ok], v[ok])
    assert i[0, 0] == 4098 and i[1, 0] == 7 and i[3, 0] == 2000
    # Ties on the block path: a valid top set of distinct columns, lowest columns first.
    t = torch.randint(0, 4, (6, 4096), generator=g).to(dtype)
    tv, ti = native.topk(t, 32)
    torch.testing.assert_close(tv, t.float().topk(32, dim=-1).values, rtol=0, atol=0)
    assert torch.equal(t.float().gather(1, ti), tv)
    assert all(len(set(r.tolist())) == 32 for r in ti)
    assert all((r == r.sort().values).all() for r in ti)  # all top values tie at 3: columns ascending


@needs_native
def test_topk_with_ties_returns_a_valid_top_set():
    x = torch.randint(0, 5, (20, 512)).float()  # many ties
    v, i = native.topk(x, 16)
    rv, _ = x.topk(16, dim=-1)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)
    assert torch.equal(x.gather(1, i), v)
    assert all(len(set(r.tolist())) == 16 for r in i)  # distinct columns


def _aux_reference(pre, cols, k_aux, bias):
    sub = (pre if bias is None else pre + bias)[:, cols]
    v, local = sub.topk(k_aux, dim=-1)
    return torch.zeros_like(sub).scatter_(1, local, v.relu()), v


@needs_native
@pytest.mark.parametrize("shift", [0.0, -2.5, 3.0])  # ~half, few, most pre-activations positive
@pytest.mark.parametrize("with_bias", [False, True])
def test_aux_select_matches_topk_of_the_columns(shift, with_bias):
    g = torch.Generator().manual_seed(1)
    B, n, n_dead, k_aux = 40, 3000, 300, 64
    pre = torch.randn(B, n, generator=g) + shift
    bias = torch.randn(n, generator=g) * 0.1 if with_bias else None
    cols = torch.randperm(n, generator=g)[:n_dead]
    z_ref, v_ref = _aux_reference(pre, cols, k_aux, bias)
    z, v0, l0 = native.aux_select(pre, cols, k_aux, dense=True, bias=bias)
    assert v0 is None and l0 is None
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    _, v, local = native.aux_select(pre, cols, k_aux, dense=False, bias=bias)
    torch.testing.assert_close(v.sort(-1).values, v_ref.sort(-1).values, rtol=0, atol=0)
    sub = (pre if bias is None else pre + bias)[:, cols]
    torch.testing.assert_close(sub.gather(1, local), v, rtol=0, atol=0)
    # Without column ids: all columns of a contiguous block.
    z2, _, _ = native.aux_select(sub.contiguous(), None, k_aux, dense=True)
    torch.testing.assert_close(z2, z_ref, rtol=0, atol=0)


@needs_native
def test_aux_select_ties_and_nan_rows():
    pre = torch.randint(-2, 3, (12, 200)).float()  # ties at the threshold
    pre[4, 10] = float("nan")
    cols = torch.arange(0, 200, 2)
    z, _, _ = native.aux_select(pre, cols, 30, dense=True)
    _, v, local = native.aux_select(pre, cols, 30, dense=False)
    sub = pre[:, cols]
    ref = sub.topk(30, dim=-1).values
    torch.testing.assert_close(v.sort(-1).values, ref.sort(-1).values, rtol=0, atol=0, equal_nan=True)
    assert all(len(set(r.tolist())) == 30 for r in local)
    assert torch.isnan(z[4]).sum() == 1
    ok = torch.arange(12) != 4
    # The dense block keeps exactly the positive part of each row's top-k_aux.
    torch.testing.assert_close(z[ok].sum(-1), ref[ok].relu().sum(-1), rtol=0, atol=0)
    assert ((z[ok] > 0).sum(-1) == (ref[ok] > 0).sum(-1)).all()


@needs_native
@pytest.mark.parametrize("k", [1, 3, 4, 32, 37])
def test_gather_dot_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    rows, y = torch.randn(500, 70, generator=g), torch.randn(64, 70, generator=g)
    idx = torch.randint(0, 500, (64, k), generator=g)
    out = native.gather_dot(idx, rows, y)
    torch.testing.assert_close(out, (rows[idx] * y.unsqueeze(1)).sum(-1), rtol=1e-5, atol=1e-5)


@needs_native
def test_project_rows_matches_formula():
    g = torch.Generator().manual_seed(2)
    grad, w = torch.randn(50, 37, generator=g), torch.randn(50, 37, generator=g)
    ref = grad - (torch.linalg.vecdot(grad, w) / torch.linalg.vecdot(w, w)).unsqueeze(1) * w
    out = native.project_rows_(grad.clone(), w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.linalg.vecdot(out, w).abs().max() < 1e-4


@needs_native
@pytest.mark.parametrize("multi_topk,k_aux", [(False, 64), (True, 64), (False, 8)])  # 8: AuxK by gathers
def test_training_step_same_with_and_without_native(monkeypatch, multi_topk, k_aux):
    torch.manual_seed(0)
    x = torch.randn(256, 24) * 2 + 0.5
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::5] = True

    def run():
        sae = TopKSAE(24, 512, 8, k_aux=k_aux, multi_topk=multi_topk, seed=0)
        sae.init_from_data(x)
        out = sae(x, dead_mask=dead)
        (out.nmse + out.auxk_loss / 32 + out.multi_topk_nmse / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        return out, {n: p.grad.clone() for n, p in sae.named_parameters()}

    out_n, grads_n = run()
    monkeypatch.setattr(native, "_load", lambda: None)
    out_t, grads_t = run()
    assert torch.equal(out_n.indices.sort(-1).values, out_t.indices.sort(-1).values)
    for name in ("nmse", "auxk_loss", "multi_topk_nmse"):
        torch.testing.assert_close(getattr(out_n, name), getattr(out_t, name), rtol=1e-5, atol=1e-7)
    for name in grads_n:
        torch.testing.assert_close(grads_n[name], grads_t[name], rtol=1e-4, atol=1e-6)


def test_without_a_compiler_everything_falls_back(tmp_path):
    code = (
        "import warnings, torch\n"
        "from sae_lit.model import native\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    ok = native.available()\n"
        "assert not ok and 'failed to compile' in native.build_error, native.build_error\n"
        "assert any('native CPU kernels unavailable' in str(m.message) for m in w)\n"
        "x = torch.randn(4, 100)\n"
        "v, i = native.topk(x, 3)\n"
        "assert torch.equal(v, x.topk(3).values)\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "CXX": "false", "SAE_LIT_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout


@needs_native
def test_bf16_rows_select_like_float32_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 2000, generator=g).bfloat16()
    bias = torch.randn(2000, generator=g) * 0.01
    v, i = native.topk(x, 16, bias=bias)
    assert v.dtype == torch.float32
    rv, ri = native.topk(x.float(), 16, bias=bias)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)
    assert torch.equal(i, ri)
    cols = torch.randperm(2000, generator=g)[:300]
    for dense in (True, False):
        got, want = native.aux_select(x, cols, 40, dense=dense, bias=bias), native.aux_select(
            x.float(), cols, 40, dense=dense, bias=bias)
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


_VARIANT_CHECK = """
import torch
from sae_lit.model import native
assert native.available(), native.build_error
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for rows, n, k in ((9, 1000, 7), (4, 4096, 32), (3, 130, 16)):
        x = torch.randn(rows, n, generator=g).to(dt)
        bias = torch.randn(n, generator=g)
        x[0, 3] = float("nan")
        v, i = native.topk(x, k, bias=bias)
        rv, ri = (x.float() + bias).topk(k, dim=-1)
        torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(i, ri)
    pre = torch.randn(50, 900, generator=g).to(dt)
    cols = torch.randperm(900, generator=g)[:200]
    sub = pre.float()[:, cols]
    tv, tl = sub.topk(40, dim=-1)
    z, _, _ = native.aux_select(pre, cols, 40, dense=True)
    ref = torch.zeros_like(sub).scatter_(1, tl, tv.relu())
    # bf16 rows have ties at the threshold; which tied column is kept may differ.
    torch.testing.assert_close(z.sort(-1).values, ref.sort(-1).values, rtol=0, atol=0)
    assert ((z == 0) | (z == sub)).all()
    _, v, l = native.aux_select(pre, cols, 40, dense=False)
    torch.testing.assert_close(v.sort(-1).values, tv.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(sub.gather(1, l), v, rtol=0, atol=0)
rows, y = torch.randn(300, 45, generator=g), torch.randn(40, 45, generator=g)
idx = torch.randint(0, 300, (40, 7), generator=g)
torch.testing.assert_close(native.gather_dot(idx, rows, y), (rows[idx] * y.unsqueeze(1)).sum(-1), rtol=1e-5, atol=1e-5)
zz, gg = torch.randn(70, 90, generator=g).relu(), torch.randn(70, 90, generator=g)
assert torch.equal(native.mask_nonpositive_(gg.clone(), zz), torch.where(zz > 0, gg, torch.zeros_like(gg)))
gr, w = torch.randn(20, 33, generator=g), torch.randn(20, 33, generator=g)
out = native.project_rows_(gr.clone(), w)
torch.testing.assert_close(out, gr - (torch.linalg.vecdot(gr, w) / torch.linalg.vecdot(w, w)).unsqueeze(1) * w)
print("variant ok")
"""


@needs_native
@pytest.mark.parametrize("flags", ["-march=native -mno-avx512f", "-march=native -mno-avx512f -mno-avx2", "-O0"],
                         ids=["avx2", "scalar", "generic"])
def test_other_instruction_sets_give_the_same_results(tmp_path, flags):
    # The CI or a user's machine may lack AVX-512 (AVX2 path) or be ARM (scalar path).
    import platform
    if platform.machine() not in ("x86_64", "AMD64") and "avx" in flags:
        pytest.skip("x86 flags")
    env = {**os.environ, "SAE_LIT_NATIVE_FLAGS": flags, "SAE_LIT_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _VARIANT_CHECK], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "variant ok" in proc.stdout


def test_keep_freed_memory_can_be_switched_off(monkeypatch):
    import platform
    monkeypatch.setenv("SAE_LIT_KEEP_FREED_MEMORY", "0")
    assert native.keep_freed_memory() is False
    monkeypatch.delenv("SAE_LIT_KEEP_FREED_MEMORY")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert native.keep_freed_memory() is True


_FORK_CHECK = """
import os, torch
from sae_lit.model import native
assert native.available(), native.build_error
x = torch.randn(256, 4096)
want = x.topk(16).values
assert torch.equal(native.topk(x, 16)[0], want)  # the parent's worker pool now exists
pid = os.fork()
if pid == 0:  # the child inherits the pool's state but none of its threads
    ok = torch.equal(native.topk(x, 16)[0], want)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert torch.equal(native.topk(x, 16)[0], want)
print("fork ok")
"""


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_native_kernels_work_in_a_forked_child(tmp_path):
    # DataLoader workers are forked; a child must not wait on the parent's worker threads.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _FORK_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fork ok" in proc.stdout


@needs_native
def test_concurrent_calls_from_python_threads_are_correct():
    from concurrent.futures import ThreadPoolExecutor
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(300, 3000, generator=g) for _ in range(8)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: native.topk(x, 12), xs))
    for x, (v, i) in zip(xs, got):
        rv, ri = x.topk(12, dim=-1)
        assert torch.equal(v, rv) and torch.equal(i, ri)


def test_mask_nonpositive_matches_where():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(300, 700, generator=g).relu()
    grad = torch.randn(300, 700, generator=g)
    want = torch.where(z > 0, grad, torch.zeros_like(grad))
    torch.testing.assert_close(native.mask_nonpositive_(grad.clone(), z), want, rtol=0, atol=0)
    torch.testing.assert_close(native.mask_nonpositive_(grad.bfloat16(), z.bfloat16()).float(),
                               want.bfloat16().float(), rtol=0, atol=0)  # torch path
