"""Caching throughput vs the bare truncated forward of the same model on the same batches.

    python benchmarks/cache_throughput.py                     # embedded SmolLM2, resid_post.15, ~1-2 min on 2 cores
    python benchmarks/cache_throughput.py --tokens 131072 --model_batch_size 32

"bare" runs only HookedForward on pre-packed contexts; "cache" is build_cache end to end
(reading and tokenising text, forward, fp16 conversion, tar writing, the final sample pass),
model loading excluded from both. Runs alternate and the best of each is kept, so a busy
machine penalises both alike. Prints numbers and their ratio; asserts nothing.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time

import numpy as np
import torch

from sae_lit.cache import CacheConfig, build_cache
from sae_lit.corpus import pack_contexts
from sae_lit.subject import HookedForward, load_model, load_tokenizer, resolve_device


def bare_forward(forward, tokens: np.ndarray, batch: int, device) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(tokens), batch):
            forward(torch.from_numpy(tokens[lo : lo + batch]).long().to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hookpoint", default="resid_post.15")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--tokens", type=int, default=32_768, help="train tokens per run (val adds 1/8)")
    p.add_argument("--context_length", type=int, default=128)
    p.add_argument("--model_batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device), load_tokenizer(args.model)
    print(f"model load: {time.perf_counter() - t0:.1f} s ({args.model} on {device}, {torch.get_num_threads()} threads)")
    forward = HookedForward(model, args.hookpoint)

    cfg = dict(
        model=args.model, hookpoint=args.hookpoint, corpus=args.corpus, context_length=args.context_length,
        train_tokens=args.tokens, val_tokens=max(args.tokens // 8, args.context_length), dtype=args.dtype,
        model_batch_size=args.model_batch_size, device=str(device),
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
        bps = probe.blocks_per_shard
        seconds = 0.0
        for split_tokens in contexts:
            for lo in range(0, len(split_tokens), bps):
                seconds += bare_forward(forward, split_tokens[lo : lo + bps], args.model_batch_size, device)
        bare.append(n_tokens / seconds)

        tmp = tempfile.mkdtemp(prefix="sae_lit_bench_")
        try:
            start = time.perf_counter()
            result = build_cache(CacheConfig(cache_dir=tmp, **cfg), progress=False, subject=(model, tokenizer))
            total = time.perf_counter() - start
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert result.tokens_computed == n_tokens
        cached.append(n_tokens / total)
        print(f"  bare {bare[-1]:8.0f} tok/s | cache {cached[-1]:8.0f} tok/s end to end ({result.tokens_per_second:.0f} in the write loop)")

    b, c = max(bare), max(cached)
    print(f"tokens per run: {n_tokens} ({args.hookpoint}, context {args.context_length}, {args.model_batch_size} contexts a forward)")
    print(f"bare truncated forward: {b:.0f} tok/s")
    print(f"caching (build_cache):  {c:.0f} tok/s")
    print(f"ratio cache/bare:       {c / b:.3f}")
    print(f"cache wall time per 1M tokens: {1e6 / c / 60:.1f} min (+ model load)")


if __name__ == "__main__":
    main()
