"""Two exported SAE folders on the same validation split: NMSE (summed over the whole split),
L0, and how far their weights are apart. For checking that a latent-parallel run trains the
SAE one process trains.

    python benchmarks/compare_exports.py A/sae B/sae --config configs/quickstart.yaml \
        [--cache_dir /path/to/cache]
"""
from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from sae_lit.evals.evaluate import datamodule_from_config, read_yaml_config
from sae_lit.model.formats import WEIGHTS_NAME, load_sae
from sae_lit.training.metrics import NMSE, MeanL0


def val_metrics(sae, dm) -> tuple[float, float]:
    nmse, l0 = NMSE(sae.d_in), MeanL0()
    with torch.no_grad():
        for x in dm.val_dataloader():
            recon, (values, _) = sae.encode_decode(x)
            nmse.update(x, recon)
            l0.update(values)
    return float(nmse.compute()), float(l0.compute())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--config", required=True, help="training config whose data: section names the cache")
    p.add_argument("--cache_dir", help="override data.init_args.cache.cache_dir")
    args = p.parse_args()
    cfg = read_yaml_config(args.config)
    if args.cache_dir:
        cfg["data"]["init_args"]["cache"]["cache_dir"] = args.cache_dir
    dm = datamodule_from_config(cfg, args.config)
    dm.setup("validate")
    results = {}
    for name in (args.a, args.b):
        results[name] = val_metrics(load_sae(name), dm)
        print(f"{name}: val/nmse {results[name][0]:.6f}  val/l0 {results[name][1]:.3f}")
    (na, _), (nb, _) = results.values()
    print(f"relative NMSE difference: {abs(na - nb) / nb:.2e}")
    wa, wb = load_file(f"{args.a}/{WEIGHTS_NAME}"), load_file(f"{args.b}/{WEIGHTS_NAME}")
    for key in sorted(wa):
        diff = (wa[key] - wb[key]).abs().max().item()
        print(f"{key}: max |a - b| {diff:.3g} (max |b| {wb[key].abs().max().item():.3g})")


if __name__ == "__main__":
    main()
