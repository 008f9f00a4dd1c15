"""Wall time of building the latent dashboard, end to end (scan, model and logits, pages).

    python benchmarks/dashboard.py                        # quickstart SAE, val split (100k tokens, 8192 latents)
    python benchmarks/dashboard.py --num_latents 16384 --split train   # an untrained 16k-latent SAE, 1M train tokens

With --num_latents, a TopK SAE of that size (k=32, tied init, b_dec from the cache's sample) is
exported to a temporary folder and used instead of --sae: the work per token is the same as
for a trained one (the encoder GEMM, the top-k and k firings per token). Prints the timings;
asserts nothing. The pages go to a temporary folder unless --out is given.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_lit.data import shards as sh
from sae_lit.dashboard import DashboardConfig, build_dashboard


def random_sae(cache: str, num_latents: int, out: Path) -> Path:
    from sae_lit.model.formats import export_sae
    from sae_lit.model.sae import TopKSAE

    manifest = sh.read_manifest(cache)
    sample = sh.decode_acts(np.load(Path(cache) / manifest["sample"]["file"]), manifest["dtype"])
    sae = TopKSAE(int(manifest["d_in"]), num_latents, k=32, normalize="constant", seed=0)
    sae.init_from_data(sample)
    return export_sae(sae, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", default="logs/quickstart/lightning_logs/version_0/sae")
    ap.add_argument("--cache", default="data/cache/quickstart")
    ap.add_argument("--split", default="val")
    ap.add_argument("--num_latents", type=int, default=None, help="benchmark an untrained SAE of this size instead")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sae = random_sae(args.cache, args.num_latents, Path(tmp) / "sae") if args.num_latents else args.sae
        out = args.out or str(Path(tmp) / "site")
        start = time.perf_counter()
        build_dashboard(DashboardConfig(sae=str(sae), cache=args.cache, out=out, split=args.split, precision=args.precision,
                                        progress=False))
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        print(f"{wall:.1f} s wall, {torch.get_num_threads()} torch threads, site {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
