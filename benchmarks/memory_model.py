"""Memory per device and communication per step of TopK SAE training, unsharded or with the
latents split over shards (sae_lit.model.sharded) and data parallel over replicas.

    python benchmarks/memory_model.py --d 4096 --n 16777216 --k 32 --batch 4096 --replicas 4 --shards 64
    python benchmarks/memory_model.py --table          # the README's table: largest n per H200
    python benchmarks/memory_model.py --measure        # the model against peak RSS on CPU
    python benchmarks/memory_model.py --measure-cuda   # ... against peak CUDA memory (one GPU)

Bytes per device (fp32 weights, as SAEModule trains them; n_s = n / shards latents):
  parameters   W_enc, W_dec [n_s, d], b_enc [n_s], b_dec [d]             4 (2 n_s d + n_s + d)
  gradients    the same                                                   4 (2 n_s d + n_s + d)
  Adam         two moments per parameter                                  8 (2 n_s d + n_s + d)
  EMA          running sums + the bias-corrected copy (ema_decay only)    8 (2 n_s d + n_s + d)
  counters     tokens since fired (int64) + firing window + val firing    12 n_s + 8 n
  activations  at the step's peak: the encoder output [B, n_s] (the one dense tensor;
               bf16 under bf16-mixed on GPU), the gathered top-k and AuxK candidates
               [B, shards c] (value, int64 id; three buffers: the all-gather's parts, their
               stack and its token-major copy; c per shard from sharded_topk's first round,
               about 4 k / shards + 4 and 2 k_aux / shards + 4), AuxK's dense [B, <= 8 k_aux / shards]
               block, one [n_s, d] weight gradient in backward (AuxK's, before it is added),
               about ten [B, d] tensors (input, centred input, reconstructions, errors) and
               the selections [B, k_sel] (value, id, local row, local value)
Bytes sent per device per step (ring collectives: an all-reduce of S bytes over G ranks sends
2 S (G - 1) / G, an all-gather of s bytes each sends s (G - 1)):
  over shards    top-k and AuxK candidates (all-gather, first round), partial reconstructions [B, d] x
                 (1 + multi + aux) (all-reduce forward), b_dec's encoder gradient [d] (backward)
  over replicas  every local gradient (all-reduce, as DDP), firing counts [n_s]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

from sae_lit.model.sharded import AUX_CAPACITY, CAPACITY, first_round

H200 = 141e9  # bytes of HBM3e on one H200


@dataclass
class Shape:
    d: int
    n: int
    k: int = 32
    batch: int = 4096  # tokens per replica per step
    replicas: int = 1
    shards: int = 1
    k_aux: int = 512
    multi_topk: bool = False
    ema: bool = False
    pre_bytes: int = 4  # the encoder output's element size: 4 fp32, 2 under bf16-mixed on GPU


def _first_rounds(s: Shape, k_sel: int, k_aux: int) -> int:
    """Candidates per token a shard sends (sharded_topk's first round; the second, for the
    rare tokens whose top k crowds one shard, is left out)."""
    if s.shards == 1:
        return k_sel + k_aux
    return first_round(k_sel, s.shards, CAPACITY) + first_round(k_aux, s.shards, AUX_CAPACITY)


def memory(s: Shape) -> dict[str, float]:
    """Bytes per device, by kind (see the module docstring)."""
    n_s = s.n / s.shards
    per_param = 2 * n_s * s.d + n_s + s.d
    k_sel = min(4 * s.k if s.multi_topk else s.k, s.n)
    k_aux = min(s.k_aux, s.n // 2)
    out = {
        "parameters": 4 * per_param,
        "gradients": 4 * per_param,
        "adam": 8 * per_param,
        "ema": 8 * per_param if s.ema else 0.0,
        "counters": 12 * n_s + 8 * s.n,
    }
    # The all-gather's parts, their stack and its token-major copy: three buffers.
    candidates = 3 * 12 * s.batch * s.shards * _first_rounds(s, k_sel, k_aux)
    aux_block = 4 * s.batch * min(n_s, 8 * math.ceil(k_aux / s.shards))
    backward = 4 * n_s * s.d  # AuxK's sparse weight gradient, before it is added into the main one
    out["activations"] = (s.pre_bytes * s.batch * n_s + candidates + aux_block + backward + 40 * s.batch * s.d
                          + 24 * s.batch * k_sel)
    out["total"] = sum(out.values())
    return out


def communication(s: Shape) -> dict[str, float]:
    """Bytes each device sends per optimizer step."""
    n_s = s.n / s.shards
    k_sel = min(4 * s.k if s.multi_topk else s.k, s.n)
    k_aux = min(s.k_aux, s.n // 2)
    out = {"shards": 0.0, "replicas": 0.0}
    P, R = s.shards, s.replicas
    if P > 1:
        gather = 12 * s.batch * _first_rounds(s, k_sel, k_aux) * (P - 1)
        recon = 4 * s.batch * s.d * (2 + s.multi_topk) * 2 * (P - 1) / P
        out["shards"] = gather + recon + 4 * s.d * 2 * (P - 1) / P
    if R > 1:
        out["replicas"] = 4 * (2 * n_s * s.d + n_s + s.d + n_s) * 2 * (R - 1) / R
    out["total"] = out["shards"] + out["replicas"]
    return out


def largest_n(d: int, shards: int, batch: int, budget: float = H200, **kw) -> int:
    """The largest n (a multiple of shards) whose per-device total fits the budget; memory is
    affine in n, so two evaluations give it."""
    f = lambda n: memory(Shape(d=d, n=n, batch=batch, shards=shards, **kw))["total"]  # noqa: E731
    base, slope = f(0), (f(1 << 20) - f(0)) / (1 << 20)
    n = int((budget - base) / slope)
    return max(0, n - n % shards)


def fmt_bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_n(n: int) -> str:
    return f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n / 2**10:.3g}k"


def print_shape(s: Shape) -> None:
    mem, com = memory(s), communication(s)
    print(f"d={s.d} n={s.n} k={s.k} batch={s.batch} replicas={s.replicas} shards={s.shards} "
          f"(n per shard {s.n // s.shards})")
    print("bytes per device:   " + "  ".join(f"{k} {fmt_bytes(v)}" for k, v in mem.items()))
    print("bytes sent per step: " + "  ".join(f"{k} {fmt_bytes(v)}" for k, v in com.items()))


def print_table() -> None:
    """Markdown: largest n one H200 holds, by d and batch, unsharded and per shard count."""
    shard_counts = (1, 8, 64)
    print("bf16-mixed (bf16 encoder output), fp32 weights + Adam, k = 32, k_aux = 512, no EMA; "
          "n is the whole dictionary (n / shards per GPU).\n")
    print("| d | tokens per step per replica | " + " | ".join(
        "unsharded (1 GPU)" if p == 1 else f"{p} shards ({p} GPUs)" for p in shard_counts) + " |")
    print("|---|---|" + "---|" * len(shard_counts))
    for d in (768, 4096):
        for batch in (4096, 131072):
            row = [fmt_n(largest_n(d, p, batch, pre_bytes=2)) for p in shard_counts]
            print(f"| {d} | {batch} | " + " | ".join(row) + " |")
    print("\n16M latents (n = 2^24):\n")
    print("| d | tokens per step per replica | total state (params + grads + Adam) | fewest shards on H200s | "
          "per GPU at 64 shards | sent per step per GPU at 64 shards |")
    print("|---|---|---|---|---|---|")
    n = 1 << 24
    for d in (768, 4096):
        for batch in (4096, 131072):
            state = sum(memory(Shape(d=d, n=n, batch=batch))[k] for k in ("parameters", "gradients", "adam"))
            fewest = next((p for p in (2**i for i in range(16)) if memory(
                Shape(d=d, n=n, batch=batch, shards=p, pre_bytes=2))["total"] <= H200), None)
            s64 = Shape(d=d, n=n, batch=batch, shards=64, pre_bytes=2)
            print(f"| {d} | {batch} | {fmt_bytes(state)} | {fewest} | {fmt_bytes(memory(s64)['total'])} | "
                  f"{fmt_bytes(communication(s64)['total'])} |")


# ------------------------------------------------------------------ measured peak RSS on CPU
def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _measure_one(d: int, n: int, batch: int, shards: int, rank: int, steps: int = 3) -> dict:
    """Peak RSS of SAEModule's step (fp32, AuxK on with a quarter of the latents dead) above
    the RSS before the SAE exists, in this process: one shard of ``shards``."""
    import torch
    import torch.distributed as dist

    from sae_lit.model.sae import TopKSAE, SAEConfig
    from sae_lit.model.sharded import LatentComm, ShardedTopKSAE

    torch.manual_seed(0)
    x = torch.randn(batch, d) * 3 + 1
    comm = LatentComm.of(dist.group.WORLD) if shards > 1 else LatentComm()
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _rss_kb()
    cfg = SAEConfig(d_in=d, num_latents=n, k=32, k_aux=512)
    sae = ShardedTopKSAE(cfg, comm) if shards > 1 else TopKSAE(cfg)
    sae.init_from_data(x)
    n_s = n // shards
    dead = torch.zeros(n_s, dtype=torch.bool)
    dead[: n_s // 4] = True
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    for _ in range(steps):
        opt.zero_grad()  # gradients freed between steps, as Lightning does
        out = sae(x, dead_mask=dead)
        (out.nmse + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    peak = _peak_kb()
    model = memory(Shape(d=d, n=n, batch=batch, shards=shards, k_aux=512))
    model_no_counters = model["total"] - model["counters"]  # this loop keeps no counters
    return {"rank": rank, "measured": (peak - before) * 1024, "model": model_no_counters}


def _measure_worker(rank: int, world: int, port: int, d: int, n: int, batch: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    print(json.dumps(_measure_one(d, n, batch, world, rank)), flush=True)
    if world > 1:
        dist.destroy_process_group()


def measure(shapes: list[tuple[int, int, int, int]]) -> None:
    """Each shape in fresh processes (a clean peak): shards = 1 or 2 processes over gloo."""
    import socket

    print("| d, n, B, shards | model (per process) | measured peak RSS growth | measured / model |")
    print("|---|---|---|---|")
    for d, n, batch, shards in shapes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code = ("import sys; sys.path.insert(0, {root!r}); from benchmarks.memory_model import _measure_worker; "
                "_measure_worker({rank}, {world}, {port}, {d}, {n}, {batch})")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        procs = [subprocess.Popen([sys.executable, "-c", code.format(root=root, rank=r, world=shards, port=port, d=d,
                                                                     n=n, batch=batch)],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for r in range(shards)]
        rows = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        for p in procs:
            if p.returncode:
                raise SystemExit(f"measurement at {(d, n, batch, shards)} failed")
        got = max(r["measured"] for r in rows)
        want = rows[0]["model"]
        print(f"| {d}, {n}, {batch}, {shards} | {fmt_bytes(want)} | {fmt_bytes(got)} | {got / want:.2f} |", flush=True)


def measure_cuda(shapes: list[tuple[int, int, int]]) -> None:
    """One GPU, one process, bf16-mixed: peak allocated bytes of the training step against the
    model (pre_bytes = 2), as benchmarks/gpu_check.sh prints it."""
    import torch

    from sae_lit.model.sae import SAEConfig, TopKSAE

    print("| d, n, B (cuda, bf16-mixed) | model | measured peak allocated | measured / model |")
    print("|---|---|---|---|")
    for d, n, batch in shapes:
        torch.cuda.empty_cache()
        x = torch.randn(batch, d, device="cuda") * 3 + 1
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sae = TopKSAE(SAEConfig(d_in=d, num_latents=n, k=32, k_aux=512)).cuda()
        sae.init_from_data(x[:4096])
        dead = torch.zeros(n, dtype=torch.bool, device="cuda")
        dead[: n // 4] = True
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = sae(x, dead_mask=dead)
                loss = out.nmse + out.auxk_loss / 32
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
        torch.cuda.synchronize()
        got = torch.cuda.max_memory_allocated() - before
        model = memory(Shape(d=d, n=n, batch=batch, pre_bytes=2))
        want = model["total"] - model["counters"]
        print(f"| {d}, {n}, {batch} | {fmt_bytes(want)} | {fmt_bytes(got)} | {got / want:.2f} |", flush=True)
        del sae, opt, out, loss, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("d", 768), ("n", 1 << 15), ("k", 32), ("batch", 4096), ("replicas", 1), ("shards", 1),
                          ("k_aux", 512)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--multi-topk", action="store_true")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 encoder output (bf16-mixed on GPU)")
    p.add_argument("--table", action="store_true", help="the README's H200 table")
    p.add_argument("--measure", action="store_true", help="the model against peak RSS on CPU at small shapes")
    p.add_argument("--measure-cuda", action="store_true", help="the model against peak CUDA memory (one GPU)")
    a = p.parse_args()
    if a.table:
        print_table()
    elif a.measure_cuda:
        measure_cuda([(768, 262144, 4096), (768, 32768, 131072), (4096, 131072, 4096)])
    elif a.measure:
        measure([(256, 16384, 2048, 1), (256, 16384, 2048, 2), (512, 65536, 1024, 1), (512, 65536, 1024, 2),
                 (768, 32768, 4096, 2)])
    else:
        print_shape(Shape(a.d, a.n, a.k, a.batch, a.replicas, a.shards, a.k_aux, a.multi_topk, a.ema,
                          2 if a.bf16 else 4))


if __name__ == "__main__":
    main()
