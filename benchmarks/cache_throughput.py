"""Caching throughput vs the bare truncated forward of the same model on the same batches.

    python benchmarks/cache_throughput.py                     # embedded SmolLM2, resid_post.15, ~1-2 min on 2 cores
    python benchmarks/cache_throughput.py --tokens 131072 --model_batch_size 32

"bare" runs only HookedForward on pre-packed contexts; "cache" is build_cache end to end
(reading and tokenising text, forward, fp16 conversion, tar writing, the final sample pass),
model loading excluded from both. Runs alternate; wall-clock rates take the best run of each,
and the CPU-time ratio (process time, all threads) is printed too because it is far less
sensitive to other processes on a shared machine. Prints numbers and ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time

import numpy as np
import torch

from sae_lit.data.cache import CacheConfig, build_cache
from sae_lit.data.corpus import pack_contexts
from sae_lit.data.subject import HookedForward, load_model, load_tokenizer, resolve_device


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
    print(f"tokens per run: {n_tokens} ({args.hookpoint}, context {args.context_length}, {args.model_batch_size} contexts a forward)")
    print(f"bare truncated forward: {b:.0f} tok/s (best run)")
    print(f"caching (build_cache):  {c:.0f} tok/s (best run, end to end)")
    print(f"ratio cache/bare, wall: {c / b:.3f}")
    print(f"ratio cache/bare, CPU:  {cpu_ratio:.3f}")
    print(f"cache wall time per 1M tokens: {1e6 / c / 60:.1f} min (+ model load)")


if __name__ == "__main__":
    main()
