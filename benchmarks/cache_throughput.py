"""Caching throughput against its limit: the bare truncated forward of the same model on the
same batches, and the roofline (FLOPs per token x tokens/s against the measured GEMM peak).

    python benchmarks/cache_throughput.py                     # embedded SmolLM2, resid_post.15, subject_dtype auto
    python benchmarks/cache_throughput.py --subject_dtype float32 --tokens 131072
    python benchmarks/cache_throughput.py --compare_dtypes --sae logs/quickstart/lightning_logs/version_0/sae

FLOPs per token of the truncated forward: 2 x (inputs x outputs) of every linear layer up to
the hookpoint's block, plus the attention matmuls at the mean causal context length. GEMM peak:
the best of a few [tokens of one forward, d_model] x [d_model, 4 d_model] matmuls in the
precision the subject runs in. ``--compare_dtypes`` also runs the same contexts in fp32 and
bf16 and prints the per-token relative error of the bf16 activations (and, with ``--sae``,
the SAE's NMSE on both).

"bare" runs only HookedForward on pre-packed contexts; "cache" is build_cache end to end
(reading and tokenising text, forward, fp16 conversion, tar writing, the final sample pass),
model loading excluded from both. Runs alternate; wall-clock rates take the best run of each,
and the CPU-time ratio (process time, all threads) is printed too because it is far less
sensitive to other processes on a shared machine. Prints numbers and ratios; asserts nothing.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import time

import numpy as np
import torch

from jsonargparse import ArgumentParser
from torch import nn

from sae_lit import load_sae
from sae_lit.data.cache import CacheConfig, build_cache, resolve_subject_dtype
from sae_lit.data.corpus import pack_contexts
from sae_lit.data.subject import HookedForward, find_blocks, hookpoint_info, load_model, load_tokenizer, resolve_device


def flops_per_token(model: nn.Module, hookpoint: str, context_length: int) -> float:
    """Forward FLOPs per token up to and including the hookpoint's block."""
    hp = hookpoint_info_from_model(model, hookpoint)
    blocks = find_blocks(model)
    names = blocks[1][: hp + 1]
    linear = sum(2 * m.in_features * m.out_features for b in names for m in b.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mean_ctx = (context_length + 1) / 2  # causal: token t attends to t tokens
    attention = len(names) * 2 * 2 * heads * head_dim * mean_ctx  # QK^T and AV
    return float(linear + attention)


def hookpoint_info_from_model(model: nn.Module, hookpoint: str) -> int:
    from sae_lit.data.subject import resolve_hookpoint

    hp = resolve_hookpoint(model, hookpoint)
    if hp.block_index is None:
        raise ValueError(f"{hookpoint}: FLOPs are counted up to a block; give a block hookpoint (resid_post.L)")
    return hp.block_index


def gemm_peak(m: int, d: int, dtype: torch.dtype, device, reps: int = 5) -> float:
    """Best FLOP/s of [m, d] x [d, 4d] in ``dtype``."""
    a, b = torch.randn(m, d, device=device, dtype=dtype), torch.randn(d, 4 * d, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * d * 4 * d / best


def bare_forward(forward, tokens: np.ndarray, batch: int, device) -> None:
    with torch.inference_mode():
        for lo in range(0, len(tokens), batch):
            forward(torch.from_numpy(tokens[lo : lo + batch]).long().to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hookpoint", default="resid_post.15")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--tokens", type=int, default=32_768, help="train tokens per run (val adds 1/8)")
    p.add_argument("--context_length", type=int, default=128)
    p.add_argument("--model_batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float16", help="storage dtype of the cache")
    p.add_argument("--subject_dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compare_dtypes", action="store_true", help="bf16 activations against fp32 on the same tokens")
    p.add_argument("--sae", default=None, help="an SAE folder for the same hookpoint: its NMSE on fp32 and bf16 activations")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    d_model = hookpoint_info(args.model, args.hookpoint)[1]
    subject_dtype = resolve_subject_dtype(args.subject_dtype, device, d_model, args.model)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device, subject_dtype), load_tokenizer(args.model)
    print(f"model load: {time.perf_counter() - t0:.1f} s ({args.model} on {device} in {subject_dtype}, "
          f"{torch.get_num_threads()} threads)")
    forward = HookedForward(model, args.hookpoint)

    cfg = dict(
        model=args.model, hookpoint=args.hookpoint, corpus=args.corpus, context_length=args.context_length,
        train_tokens=args.tokens, val_tokens=max(args.tokens // 8, args.context_length), dtype=args.dtype,
        model_batch_size=args.model_batch_size, device=str(device), subject_dtype=subject_dtype,
    )
    probe = CacheConfig(**cfg)
    corpus = probe.corpus_obj()
    # The very contexts build_cache will run, batched the same way (per split, per shard).
    contexts = []
    for split, n_tokens in (("train", probe.train_tokens), ("val", probe.val_tokens)):
        packed = itertools.islice(pack_contexts(corpus.documents(split), tokenizer, args.context_length), n_tokens // args.context_length)
        contexts.append(np.stack([c.tokens for c in packed]))
    n_tokens = sum(c.size for c in contexts)

    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        forward(torch.from_numpy(contexts[0][: args.model_batch_size]).long().to(device))

    bare, cached = [], []
    for _ in range(args.repeats):
        with Clock() as clock:
            for split_tokens in contexts:
                for lo in range(0, len(split_tokens), probe.blocks_per_shard):
                    bare_forward(forward, split_tokens[lo : lo + probe.blocks_per_shard], args.model_batch_size, device)
        bare.append(clock)

        tmp = tempfile.mkdtemp(prefix="sae_lit_bench_")
        try:
            with Clock() as clock:
                result = build_cache(CacheConfig(cache_dir=tmp, **cfg), progress=False, subject=(model, tokenizer))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert result.tokens_computed == n_tokens
        cached.append(clock)
        print(
            f"  bare {n_tokens / bare[-1].wall:6.0f} tok/s ({bare[-1].cpu:5.1f} s CPU) | cache {n_tokens / clock.wall:6.0f} "
            f"tok/s end to end ({clock.cpu:5.1f} s CPU; {result.tokens_per_second:.0f} tok/s in the write loop)"
        )

    b, c = n_tokens / min(x.wall for x in bare), n_tokens / min(x.wall for x in cached)
    cpu_ratio = min(x.cpu for x in bare) / min(x.cpu for x in cached)
    fpt = flops_per_token(model, args.hookpoint, args.context_length)
    peak = gemm_peak(args.model_batch_size * args.context_length, d_model, getattr(torch, subject_dtype), device)
    print(f"tokens per run: {n_tokens} ({args.hookpoint}, context {args.context_length}, {args.model_batch_size} contexts a forward)")
    print(f"bare truncated forward: {b:.0f} tok/s (best run)")
    print(f"caching (build_cache):  {c:.0f} tok/s (best run, end to end)")
    print(f"ratio cache/bare, wall: {c / b:.3f}")
    print(f"ratio cache/bare, CPU:  {cpu_ratio:.3f}")
    print(f"FLOPs per token (truncated forward): {fpt / 1e6:.1f} MFLOP")
    print(f"GEMM peak ({subject_dtype}, measured): {peak / 1e9:.1f} GFLOP/s")
    print(f"roofline fraction: bare {b * fpt / peak:.3f}, caching {c * fpt / peak:.3f}")
    print(f"cache wall time per 1M tokens: {1e6 / c / 60:.1f} min (+ model load)")
    if args.compare_dtypes:
        compare_dtypes(args, contexts[1][:64], device)


@torch.no_grad()
def compare_dtypes(args, contexts: np.ndarray, device) -> None:
    """Per-token relative error of bf16 activations against fp32 on the same contexts."""
    ids = torch.from_numpy(contexts).long().to(device)
    acts = {}
    for dtype in ("float32", "bfloat16"):
        m = load_model(args.model, device, dtype)
        acts[dtype] = HookedForward(m, args.hookpoint)(ids).float()[:, 1:].reshape(-1, m.config.hidden_size)  # BOS out
        del m
    rel = ((acts["bfloat16"] - acts["float32"]).norm(dim=-1) / acts["float32"].norm(dim=-1)).cpu()
    q = torch.quantile(rel, torch.tensor([0.5, 0.99]))
    print(f"bf16 vs fp32 activations, {rel.numel()} tokens: relative error per token median {q[0]:.4f}, "
          f"p99 {q[1]:.4f}, max {rel.max():.4f}")
    if args.sae:
        sae = load_sae(args.sae)
        for dtype, x in acts.items():
            x = x.cpu()
            keep = x.norm(dim=-1) <= 10 * x.norm(dim=-1).median()  # training's outlier rule
            x = x[keep]
            recon = sae.reconstruct(x)
            nmse = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
            print(f"  SAE NMSE on {dtype} activations: {nmse:.4f}")


if __name__ == "__main__":
    main()
