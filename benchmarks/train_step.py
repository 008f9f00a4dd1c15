"""Tokens/s of the full TopK SAE training step against the floor, in one run.

    python benchmarks/train_step.py                      # CPU, the default shapes
    python benchmarks/train_step.py --shapes 576,16384,32,4096 --threads 2
    python benchmarks/train_step.py --device cuda --precision bf16-mixed --shapes 768,32768,32,131072

Floor: one dense encoder GEMM (bias included) + torch.topk at the same shapes, no grad
(PAPER.md, "Kernels") — what any TopK SAE must spend per batch. Step: what SAEModule does
per optimizer step — forward with AuxK on (~10% of latents dead), backward, removal of the
gradient parallel to decoder rows, gradient clipping, fused Adam, decoder renormalisation,
firing counters. "naive" is the same step with plain dense autograd (dense [B, n] latents).

Columns: step/floor (higher is better); the step with AuxK's dead-latent GEMMs in bf16
(auxk_bf16=True); the step against a "plain" floor that allocates its [B, n] output afresh
each call as a straightforward implementation does; and the step against a "native" floor
that selects the way the step does (bias-free GEMM + sae_lit's native top-k on CPU, see
sae_lit/native.py), i.e. how close the rest of the step comes to its own selection.
On CPU the process first gets native.keep_freed_memory(), as SAEModule does when it
trains on CPU (--no-keep-freed-memory to compare).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from sae_lit.model import native
from sae_lit.model.sae import TopKSAE

DEFAULT_SHAPES = ["576,16384,32,4096", "576,4096,32,4096", "768,32768,32,2048"]


def time_interleaved(fns: dict, sync, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, timed in alternation so that load from
    other processes hits all of them alike (the ratios are what we report)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def make_step(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, autocast, naive: bool = False):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.int64, device=x.device)

    def step():
        with autocast():
            if naive:
                out_nmse, values, indices = naive_forward(sae, x)
                loss = out_nmse
            else:
                out = sae(x, dead_mask=dead)
                loss = out.nmse + out.auxk_loss / 32 + out.multi_topk_nmse / 8
                values, indices = out.values, out.indices
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            counts = torch.bincount(indices[values > 0], minlength=sae.num_latents)
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[counts > 0] = 0

    return step


def naive_forward(sae: TopKSAE, x: torch.Tensor):
    """Dense autograd reference: [B, n] latents, dense decoder matmul, dense backward."""
    x_n, _ = sae.normalize_input(x)
    pre = (x_n - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    v, i = pre.topk(sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    recon = z @ sae.W_dec + sae.b_dec
    nmse = (recon - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum()
    return nmse, v.relu(), i


def bench(d: int, n: int, k: int, B: int, device: str, precision: str, reps: int, naive: bool,
          multi_topk: bool = False) -> dict:
    torch.manual_seed(0)
    sae = TopKSAE(d, n, k, seed=0, multi_topk=multi_topk).to(device)
    x = torch.randn(B, d, device=device) * 3 + 1
    sae.init_from_data(x[:4096])
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[torch.randperm(n, device=device)[: n // 10]] = True  # ~10% dead: AuxK on
    if device == "cuda":
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
    if precision == "bf16-mixed":
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    x_n = sae.normalize_input(x)[0]

    def floor():
        # The same GEMM code path as the step (incl. its reused output buffer on CPU).
        with torch.no_grad(), autocast():
            pre = sae._dense_pre_acts(x_n - sae.b_dec)
            pre.topk(k, dim=-1, sorted=False)

    def floor_plain():
        # The same without the reused output buffer: what a plain PyTorch implementation pays.
        with torch.no_grad(), autocast():
            torch.addmm(sae.b_enc, x_n - sae.b_dec, sae.W_enc.t()).topk(k, dim=-1, sorted=False)

    def floor_native():
        # The step's own selection path: bias-free GEMM + sae_lit's top-k (native on CPU).
        with torch.no_grad(), autocast():
            pre, bias = sae._encoder_gemm(x_n - sae.b_dec)
            native.topk(pre, k, bias=bias)

    sae_bf = TopKSAE(d, n, k, seed=0, auxk_bf16=True, multi_topk=multi_topk).to(device)
    sae_bf.init_from_data(x[:4096])
    fns = {"floor": floor, "floor_plain": floor_plain, "floor_native": floor_native,
           "step": make_step(sae, x, dead, autocast),
           "step_bf": make_step(sae_bf, x, dead, autocast)}
    if naive:
        sae2 = TopKSAE(d, n, k, seed=0).to(device)
        sae2.init_from_data(x[:4096])
        fns["naive"] = make_step(sae2, x, dead, autocast, naive=True)
    t = time_interleaved(fns, sync, reps)
    res = {"shape": f"d={d} n={n} k={k} B={B}", "floor_tok_s": B / t["floor"], "step_tok_s": B / t["step"],
           "ratio": t["floor"] / t["step"], "ratio_bf": t["floor"] / t["step_bf"],
           "ratio_plain": t["floor_plain"] / t["step"], "ratio_native": t["floor_native"] / t["step"],
           "topk_speedup": t["floor"] / t["floor_native"]}
    if naive:
        res.update(naive_tok_s=B / t["naive"], naive_ratio=t["floor"] / t["naive"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="d,n,k,B tuples")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-naive", action="store_true", help="skip the dense-autograd reference")
    ap.add_argument("--multi-topk", action="store_true",
                    help="the step with Multi-TopK (top 4k selected and decoded too); the floor stays GEMM + top-k")
    ap.add_argument("--no-keep-freed-memory", action="store_true",
                    help="leave glibc's allocator as is (SAEModule tunes it on CPU; see native.keep_freed_memory)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_keep_freed_memory:
        native.keep_freed_memory()  # as SAEModule does when it trains on CPU
    print(f"device={args.device} precision={args.precision} threads={torch.get_num_threads()} torch={torch.__version__}"
          f" native_kernels={native.available() if args.device == 'cpu' else 'n/a'} multi_topk={args.multi_topk}")
    header = (f"{'shape':<32} {'floor tok/s':>12} {'step tok/s':>12} {'step/floor':>10} {'auxk_bf16/floor':>15}"
              f" {'step/plain floor':>16} {'step/native floor':>17}")
    if not args.no_naive:
        header += f" {'naive tok/s':>12} {'naive/floor':>11}"
    print(header)
    for spec in args.shapes:
        d, n, k, B = (int(v) for v in spec.split(","))
        r = bench(d, n, k, B, args.device, args.precision, args.reps, not args.no_naive, args.multi_topk)
        line = (f"{r['shape']:<32} {r['floor_tok_s']:>12.0f} {r['step_tok_s']:>12.0f} {r['ratio']:>10.3f}"
                f" {r['ratio_bf']:>15.3f} {r['ratio_plain']:>16.3f} {r['ratio_native']:>17.3f}")
        if "naive_ratio" in r:
            line += f" {r['naive_tok_s']:>12.0f} {r['naive_ratio']:>11.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
