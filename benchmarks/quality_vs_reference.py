"""Quality check: our trained SAE vs a compact, paper-faithful dense reference trained on
the same activations with the same (n, k, tokens, lr schedule).

    python main.py fit --config configs/quickstart.yaml          # produces .../sae/
    python benchmarks/quality_vs_reference.py --config configs/quickstart.yaml --sae logs/quickstart/lightning_logs/version_0/sae

    # the reproduction report's k = 8 dead-latent run (AuxK on), ours and the reference:
    python main.py fit --config configs/sweeps/base_cpu.yaml --model.sae.num_latents=8192 --model.sae.k=8 \
        --model.lr=0.00099 --trainer.default_root_dir=logs/k8
    python benchmarks/quality_vs_reference.py --config configs/sweeps/base_cpu.yaml \
        --override model.sae.num_latents=8192 --override model.sae.k=8 --override model.lr=0.00099 \
        --sae logs/k8/lightning_logs/version_0/sae

The reference below is written from the paper's equations with plain dense autograd and
shares no code with sae_lit's SAE or kernels: dense [B, n] latents, tied init, unit-norm
decoder with the parallel gradient removed, geometric-median b_pre, one dataset scale,
AuxK (k_aux, 1/32), Adam(0.9, 0.999, eps 6.25e-10), the config's LR schedule, grad
clipping, and the same seed for the random decoder directions. It reads
the same training stream (same batches in the same order) through the data module.
Both SAEs are scored by the same whole-split NMSE on the validation split, and by the
fraction of latents that never fire on it (dead latents: AuxK's job).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from sae_lit.training.cli import cli_main
from sae_lit.model.formats import load_sae


class ReferenceTopK(torch.nn.Module):
    def __init__(self, d: int, n: int, k: int, k_aux: int, scale: float, b_pre: torch.Tensor, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.clone())
        self.W_enc = torch.nn.Parameter(w.clone())  # tied init
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_pre = torch.nn.Parameter(b_pre.clone())
        self.k, self.k_aux, self.scale = k, k_aux, scale

    def forward(self, x_raw: torch.Tensor, dead: torch.Tensor | None = None):
        x = x_raw * self.scale
        pre = (x - self.b_pre) @ self.W_enc.t() + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        recon = z @ self.W_dec + self.b_pre
        var = (x - x.mean(0)).pow(2).sum()
        loss = (recon - x).pow(2).sum() / var
        aux = torch.zeros(())
        if dead is not None and dead.any():
            e = (x - recon).detach()
            pre_d = ((x - self.b_pre).detach() @ self.W_enc.t() + self.b_enc).masked_fill(~dead, -math.inf)
            n_dead = int(dead.sum())
            av, ai = pre_d.topk(min(self.k_aux, n_dead), dim=-1)
            e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ self.W_dec
            aux = min(n_dead / self.k_aux, 1.0) * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
            aux = torch.nan_to_num(aux)
        return loss, aux, z

    @torch.no_grad()
    def encode(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (x_raw * self.scale - self.b_pre) @ self.W_enc.t() + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        return v.relu(), i

    @torch.no_grad()
    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        v, i = self.encode(x_raw)
        z = torch.zeros(x_raw.shape[0], self.W_dec.shape[0]).scatter(1, i, v)
        return (z @ self.W_dec + self.b_pre) / self.scale


def weiszfeld(points: torch.Tensor, iters: int = 100) -> torch.Tensor:
    p = points.double()
    m = p.mean(0)
    for _ in range(iters):
        w = 1 / (p - m).norm(dim=1).clamp_min(1e-12)
        m = (w[:, None] * p).sum(0) / w.sum()
    return m.float()


def val_nmse(recon_fn, dm) -> tuple[float, float]:
    sse = sum_x = sum_sq = count = 0.0
    for x in dm.val_dataloader():
        x = x.float()
        sse += (x - recon_fn(x)).double().pow(2).sum().item()
        sum_x = sum_x + x.double().sum(0)
        sum_sq += x.double().pow(2).sum().item()
        count += x.shape[0]
    nmse = sse / (sum_sq - count * (sum_x / count).pow(2).sum().item())
    return nmse, count


@torch.no_grad()
def val_dead_fraction(encode_fn, dm, n: int) -> float:
    """Fraction of latents that never fire (value > 0 in the top k) on the validation split."""
    fired = torch.zeros(n, dtype=torch.bool)
    for x in dm.val_dataloader():
        v, i = encode_fn(x.float())
        fired[i[v > 0]] = True
    return 1.0 - fired.float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, nargs="+")
    ap.add_argument("--sae", required=True, help="our exported SAE folder from the same config")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override as given to main.py, e.g. model.sae.k=8 (repeatable)")
    args = ap.parse_args()
    cli_args = [a for c in args.config for a in ("--config", c)] + [f"--{o}" for o in args.override]
    cli = cli_main(cli_args, run=False)
    dm, hp, trainer = cli.datamodule, cli.model.hparams, cli.trainer
    dm.prepare_data()
    dm.setup("fit")
    steps = trainer.max_steps
    lr = cli.model.lr
    clip = trainer.gradient_clip_val or 0.0

    sample = dm.init_sample(hp.init_sample_size)
    scale = dm.norm_scale or math.sqrt(sample.shape[1] / sample.pow(2).sum(1).mean().item())
    # Same seed as SAEModule: both start from the same random directions, so what differs
    # afterwards is the implementation, not the luck of the init.
    ref = ReferenceTopK(dm.d_in, hp.num_latents, hp.k, min(hp.k_aux, hp.num_latents // 2), scale,
                        weiszfeld(sample * scale), seed=hp.seed)
    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=tuple(hp.betas), eps=hp.eps)
    since_fired = torch.zeros(hp.num_latents, dtype=torch.long)
    t0 = time.perf_counter()
    def lr_at(step: int) -> float:  # linear warmup, then constant or decaying from decay_start
        if hp.warmup_steps and step < hp.warmup_steps:
            return lr * (step + 1) / hp.warmup_steps
        start = max(int(hp.decay_start * steps), hp.warmup_steps)
        if hp.lr_decay == "none" or step < start:
            return lr
        frac = min((step - start) / max(steps - start, 1), 1.0)
        return lr * (1 - frac if hp.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * frac)))

    for step, x in zip(range(steps), dm.train_dataloader()):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        dead = since_fired >= hp.dead_tokens
        loss, aux, z = ref(x.float(), dead)
        (loss + hp.auxk_alpha * aux).backward()
        with torch.no_grad():
            w, g = ref.W_dec, ref.W_dec.grad
            g -= (g * w).sum(1, keepdim=True) * w
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True)
            since_fired += x.shape[0]
            since_fired[(z > 0).any(0)] = 0
    ref_time = time.perf_counter() - t0

    ours = load_sae(args.sae)
    nmse_ours, n_tok = val_nmse(ours.reconstruct, dm)
    nmse_ref, _ = val_nmse(ref.reconstruct, dm)
    print(f"same data: {steps} steps x {dm.batch_size} tokens, n={hp.num_latents}, k={hp.k}, lr={lr:.3g}; "
          f"validation tokens: {int(n_tok)}")
    dead_ours = val_dead_fraction(ours.encode, dm, hp.num_latents)
    dead_ref = val_dead_fraction(ref.encode, dm, hp.num_latents)
    train_dead_ref = (since_fired >= hp.dead_tokens).float().mean().item()
    print(f"{'':<22} {'val NMSE':>9} {'dead (val)':>11}")
    print(f"{'sae_lit (exported)':<22} {nmse_ours:>9.4f} {dead_ours:>11.4f}")
    print(f"{'dense reference':<22} {nmse_ref:>9.4f} {dead_ref:>11.4f}   (trained in {ref_time:.0f} s;"
          f" dead by the AuxK criterion at the end: {train_dead_ref:.4f})")
    print(f"ratio ours/reference: {nmse_ours / nmse_ref:.3f} (<= 1 means ours is at least as good)")


if __name__ == "__main__":
    main()
