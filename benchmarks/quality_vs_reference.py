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

The reference below is written from the equations of OpenAI's released train.py (and
PAPER.md) with plain dense autograd, and shares no code with sae_lit's SAE, kernels or
training module: dense [B, n] latents; tied init from the same seeded random directions;
geometric-median b_pre (Weiszfeld); one dataset scale on the input; per-batch NMSE; unit-norm
decoder rows with the parallel gradient component removed before the step and the rows
renormalised after it; Adam(0.9, 0.999, eps 6.25e-10); the config's LR schedule and gradient
clipping. Dead latents and AuxK as the reference code has them: the firing counters are
updated with this batch first and the dead mask taken after; the top k_aux dead
pre-activations (encoder input x - b_pre), ReLU'd, decoded with b_pre against
x - x_hat.detach() + b_pre.detach(), normalised by that target's variance, weight alpha, no
other scale, NaN -> 0. It reads the same training stream (same batches, same order) through
the data module. Both SAEs are scored by the same whole-split NMSE on the validation split,
and by the fraction of latents that never fire on it.
"""
from __future__ import annotations

import math
import time

import torch
from jsonargparse import ArgumentParser

from sae_lit import load_sae
from sae_lit.training.cli import cli_main


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

    def forward(self, x_raw: torch.Tensor, since_fired: torch.Tensor, dead_tokens: int | None):
        """(main loss, AuxK loss); updates ``since_fired`` (tokens since each latent fired)."""
        x = x_raw * self.scale
        pre = (x - self.b_pre) @ self.W_enc.t() + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(1, i, v.relu())
        recon = z @ self.W_dec + self.b_pre
        loss = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        with torch.no_grad():  # counters first, dead mask after (the reference's order)
            since_fired += x.shape[0]
            since_fired[(z > 0).any(0)] = 0
        aux = torch.zeros(())
        if dead_tokens is not None:
            dead = since_fired >= dead_tokens
            if dead.any():
                target = x - recon.detach() + self.b_pre.detach()
                av, ai = pre.masked_fill(~dead, -math.inf).topk(min(self.k_aux, int(dead.sum())), dim=-1)
                e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ self.W_dec + self.b_pre
                aux = torch.nan_to_num((e_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())
        return loss, aux

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
        new = (w[:, None] * p).sum(0) / w.sum()
        done = (new - m).norm() <= 1e-6 * max(1.0, m.norm().item())
        m = new
        if done:
            break
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


def compare(config: list[str], sae: str, override: list[str] | None = None) -> dict:
    """Train the dense reference on the config's data and compare it with our exported SAE.

    Args:
        config: the training config file(s) our SAE was trained with (stacked like main.py's).
        sae: our exported SAE folder from the same config.
        override: config overrides as given to main.py, e.g. model.sae.k=8 (repeatable).
    """
    cli_args = [a for c in config for a in ("--config", c)] + [f"--{o}" for o in override or []]
    cli = cli_main(cli_args, run=False)
    dm, hp, trainer = cli.datamodule, cli.model.hparams, cli.trainer
    arch = hp.sae  # the SAE's config as a dict
    n, k = arch["num_latents"], arch["k"]
    dm.prepare_data()
    dm.setup("fit")
    steps = trainer.max_steps
    lr = cli.model.lr
    clip = trainer.gradient_clip_val or 0.0

    sample = dm.init_sample(hp.init_sample_size)
    scale = dm.norm_scale or math.sqrt(sample.shape[1] / sample.pow(2).sum(1).mean().item())
    # Same seed as the SAE's: both start from the same random directions, so what differs
    # afterwards is the implementation, not the luck of the init.
    ref = ReferenceTopK(dm.d_in, n, k, min(arch["k_aux"], n // 2), scale, weiszfeld(sample * scale), seed=arch["seed"])
    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=tuple(hp.betas), eps=hp.eps)
    since_fired = torch.zeros(n, dtype=torch.long)
    auxk_on = hp.auxk_alpha > 0
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
        loss, aux = ref(x.float(), since_fired, hp.dead_tokens if auxk_on else None)
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
    ref_time = time.perf_counter() - t0

    ours = load_sae(sae)
    nmse_ours, n_tok = val_nmse(ours.reconstruct, dm)
    nmse_ref, _ = val_nmse(ref.reconstruct, dm)
    print(f"same data: {steps} steps x {dm.batch_size} tokens, n={n}, k={k}, lr={lr:.3g}; "
          f"validation tokens: {int(n_tok)}")
    dead_ours = val_dead_fraction(ours.encode, dm, n)
    dead_ref = val_dead_fraction(ref.encode, dm, n)
    train_dead_ref = (since_fired >= hp.dead_tokens).float().mean().item()
    print(f"{'':<22} {'val NMSE':>9} {'dead (val)':>11}")
    print(f"{'sae_lit (exported)':<22} {nmse_ours:>9.4f} {dead_ours:>11.4f}")
    print(f"{'dense reference':<22} {nmse_ref:>9.4f} {dead_ref:>11.4f}   (trained in {ref_time:.0f} s;"
          f" dead by the AuxK criterion at the end: {train_dead_ref:.4f})")
    print(f"ratio ours/reference: {nmse_ours / nmse_ref:.3f} (<= 1 means ours is at least as good)")
    return {"nmse_ours": nmse_ours, "nmse_ref": nmse_ref, "dead_ours": dead_ours, "dead_ref": dead_ref,
            "train_dead_ref": train_dead_ref}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, nargs="+", help="training config file(s) of our SAE")
    parser.add_argument("--sae", required=True, help="our exported SAE folder from the same config")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override as given to main.py, e.g. model.sae.k=8 (repeatable)")
    args = parser.parse_args(argv)
    return compare(args.config, args.sae, args.override)


if __name__ == "__main__":
    main()
