"""SAEModule: the LightningModule around TopKSAE — optimisation, dead-latent tracking,
logging, EMA and export. The SAE itself (sae.py) knows nothing of Lightning."""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import math
import time
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from sae_lit.common import acts_of
from sae_lit.data.source import ActivationSource
from sae_lit.model import native
from sae_lit.model.activations import LOADED_ONLY
from sae_lit.model.formats import ExportFormat, export_sae
from sae_lit.model.sharded import ShardedTopKSAE
from sae_lit.model.sharded_io import export_sharded
from sae_lit.training.resume import ResumeMismatchError, changes, mismatch_message, split_changes
from sae_lit.model.sae import SAEConfig, TopKSAE
from sae_lit.training.metrics import NMSE, FiringCounts, MeanL0


def default_lr(num_latents: int) -> float:
    """2e-4 at 2^14 latents, scaled as 1/sqrt(n) (PAPER.md, "Training details")."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


class SAEModule(L.LightningModule):
    def __init__(
        self,
        sae: SAEConfig,
        auxk_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        l1_coeff: float = 0.0,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 6.25e-10,
        warmup_steps: int = 100,
        lr_decay: Literal["none", "linear", "cosine"] = "none",
        decay_start: float = 0.8,
        ema_decay: float | None = None,
        init_sample_size: int = 32768,
        histogram_every_n_steps: int = 200,
        dead_adam_reset: bool = False,
        defer_init: bool = False,
    ):
        """
        Args:
            sae: the SAE's architecture (sae_lit.model.sae.SAEConfig; its d_in is linked from
                the data module by the CLI), or an already built TopKSAE to train.
            auxk_alpha: AuxK loss weight; 0 turns AuxK off (TopK, BatchTopK, Matryoshka).
            dead_tokens: a latent is dead after this many training tokens without firing.
            l1_coeff: L1 penalty weight (ReLU, ProLU, Gated).
            lr: Adam learning rate; None -> 2e-4 / sqrt(num_latents / 2^14).
            warmup_steps: linear warmup length in optimizer steps.
            lr_decay: schedule after warmup; decay starts at decay_start * total steps.
            ema_decay: keep an EMA of the weights (e.g. 0.999) used for validation and export.
            init_sample_size: activations used for the geometric-median init of b_dec.
            histogram_every_n_steps: how often the latent-density histogram is logged.
            dead_adam_reset: ablation, off by default (the reference keeps them): zero a latent's
                Adam moments when it dies, so that AuxK's steps on it start afresh.
            defer_init: build the SAE in configure_model instead of here: under
                LatentParallelStrategy each rank then only ever allocates its latent shard
                (needed when the whole SAE does not fit one device). Until then ``sae`` is None.
        """
        super().__init__()
        given = sae if isinstance(sae, TopKSAE) else None
        cfg = given.cfg if given is not None else SAEConfig.from_dict(sae) if isinstance(sae, dict) else sae
        if cfg.activation in LOADED_ONLY:
            raise ValueError("activation 'jumprelu' is for loaded SAEs (fixed per-latent thresholds); sae_lit does "
                             "not train it: train 'batchtopk' (exported as a JumpReLU) instead")
        # save_hyperparameters reads the init arguments from this frame: saving the SAE's
        # config as a plain dict keeps hparams.yaml readable and lets a checkpoint rebuild the
        # SAE (an injected module is saved as its config + state dict).
        sae = dataclasses.asdict(cfg)
        self.save_hyperparameters()
        self.sae_config = cfg
        self.sae: TopKSAE | ShardedTopKSAE | None = None
        self.ema: TopKSAE | ShardedTopKSAE | None = None
        self.weight_ema: WeightEMA | None = None
        self._ema_written = -1  # the update count self.ema was last written at
        self.lr = lr if lr is not None else default_lr(cfg.num_latents)
        self._window_tokens = 0
        self.val_nmse = NMSE(cfg.d_in)
        self.val_l0 = MeanL0()
        self.val_firing = FiringCounts(cfg.num_latents)
        self.export_metadata: dict = {}
        self._replica_group = None  # set under LatentParallelStrategy with more than one replica
        self._num_replicas = 1
        if given is not None or not defer_init:
            self._attach(given if given is not None else TopKSAE(cfg))

    def _attach(self, sae: TopKSAE | ShardedTopKSAE) -> None:
        """Make ``sae`` the trained SAE, with its EMA and per-latent counters (one shard's
        latents for a ShardedTopKSAE)."""
        self.sae = sae
        if self.hparams.ema_decay is not None:
            self.weight_ema = WeightEMA(sae, self.hparams.ema_decay)
            self.ema = copy.deepcopy(sae).requires_grad_(False)  # the bias-corrected average, for eval
        n = sae.num_local if isinstance(sae, ShardedTopKSAE) else sae.num_latents
        # Training tokens since each latent last fired (value > 0 in the top k). Global over
        # replicas: every rank adds the global batch and resets on any replica's firing.
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64, device=sae.b_dec.device))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64, device=sae.b_dec.device))
        # How often each latent fired over all training tokens: the export's firing densities
        # (SAELens's sparsity.safetensors).
        self.register_buffer("fire_counts", torch.zeros(n, dtype=torch.int64, device=sae.b_dec.device))
        self.register_buffer("fire_window", torch.zeros(n, device=sae.b_dec.device), persistent=False)

    def configure_model(self) -> None:
        """Build the SAE if deferred; under LatentParallelStrategy, keep only this rank's shard
        (a slice of the SAE built here or given, so the same values as one process)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        comm = getattr(strategy, "latent_comm", None)
        if comm is None:
            if self.sae is None:
                self._attach(TopKSAE(self.sae_config))
            return
        self._num_replicas = strategy.num_replicas
        self._replica_group = strategy.replica_group if strategy.num_replicas > 1 else None
        if isinstance(self.sae, ShardedTopKSAE):
            return
        if self.sae is None:
            sharded = ShardedTopKSAE(self.sae_config, comm, device=strategy.root_device)
        else:
            sharded = ShardedTopKSAE.from_full(self.sae, comm)
        self._attach(sharded)

    @property
    def sharded(self) -> bool:
        return isinstance(self.sae, ShardedTopKSAE)

    def _replicas(self) -> int:
        """Processes that see different data: the replicas when sharded, else every rank."""
        if self.sharded:
            return self._num_replicas
        return self.trainer.world_size if self._trainer is not None else 1

    # ------------------------------------------------------------------ setup
    @property
    def eval_sae(self) -> TopKSAE:
        """The SAE that validation, the evals and the export see: the EMA of the weights when
        ema_decay is set (after at least one step), else the trained SAE itself."""
        if self.ema is None or int(self.weight_ema.steps) == 0:
            return self.sae
        if self._ema_written != int(self.weight_ema.steps):
            self.weight_ema.write_to(self.ema, self.sae)
            self._ema_written = int(self.weight_ema.steps)
        return self.ema

    def setup(self, stage: str) -> None:
        # TensorBoard's HPARAMS tab compares runs by val/nmse (declared at the first
        # validation), not by Lightning's placeholder hp_metric = -1.
        if isinstance(self.logger, TensorBoardLogger):
            self.logger._default_hp_metric = False

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.trainer.max_steps and self.trainer.max_steps > 0:
            print(self._summary())
        if self.device.type == "cpu":
            native.keep_freed_memory()  # no page faults on the step's large temporaries
        dm = getattr(self.trainer, "datamodule", None)
        source = dm if isinstance(dm, ActivationSource) else None
        if source is not None:
            self.export_metadata = source.export_metadata()
        if bool(self.sae.initialized):
            return  # resumed from a checkpoint, or initialised by the user
        if source is None:
            raise RuntimeError(
                "SAEModule needs a data-dependent init (geometric-median b_dec, input scale): fit with a data "
                "module that is a sae_lit.data.source.ActivationSource (d_in, norm_scale, init_sample, "
                "export_metadata), or call module.sae.init_from_data(sample) first."
            )
        sample = source.init_sample(self.hparams.init_sample_size).to(self.device)
        self.sae.init_from_data(sample, scale=source.norm_scale)
        # The sample is deterministic and identical on every rank; broadcast anyway so that a
        # nondeterministic reduction order cannot leave the ranks with different biases.
        for t in (self.sae.b_dec.data, self.sae.input_scale):
            t.copy_(self.trainer.strategy.broadcast(t, src=0))
        if self.ema is not None:
            self.ema.load_state_dict(self.sae.state_dict())

    def _summary(self) -> str:
        cfg, tr = self.sae.cfg, self.trainer
        batch = getattr(tr.datamodule, "batch_size", None)
        tokens = f" x {batch:,} tokens = {_count(tr.max_steps * batch * tr.world_size)} tokens" if batch else ""
        params = sum(p.numel() for p in self.sae.parameters())
        return (f"SAE: {cfg.activation} d_in={cfg.d_in} latents={cfg.num_latents:,} k={cfg.k} "
                f"({_count(params)} parameters), lr {self.lr:.3g}; training {tr.max_steps:,} steps{tokens}")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = acts_of(batch)
        hp = self.hparams
        act = self.sae.act
        auxk_on = hp.auxk_alpha > 0 and (act is None or act.supports_auxk)
        # Dead once this batch is counted; the SAE takes out the latents that fire in it (the
        # reference code updates its counters first and masks after).
        candidates = self.tokens_since_fired + x.shape[0] * self._replicas() >= hp.dead_tokens
        log_now = self._trainer is not None and self.global_step % max(self.trainer.log_every_n_steps, 1) == 0
        out = self.sae(x, dead_mask=candidates if auxk_on else None, diagnose=log_now)
        loss = out.nmse + out.extra_loss
        if auxk_on:
            loss = loss + hp.auxk_alpha * out.auxk_loss
        if self.sae.multi_topk and act is None:
            loss = loss + out.multi_topk_nmse / 8
        if act is not None and act.uses_l1:
            loss = loss + hp.l1_coeff * out.l1_loss
            self.log("train/l1", out.l1_loss.detach(), on_step=True, batch_size=x.shape[0])
        self._track_firing(out.values.detach(), out.indices, x.shape[0])
        dead_frac = self._dead_fraction()

        l0 = (out.values.detach() > 0).sum(-1).float().mean()
        if log_now:
            self._log_throughput(x.shape[0] * self._replicas())
        self.log_dict(
            {"train/loss": loss.detach(), "train/nmse": out.nmse.detach(), "train/auxk": out.auxk_loss.detach(),
             "train/l0": l0, "train/dead_frac": dead_frac,
             "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]},
            on_step=True, on_epoch=False, batch_size=x.shape[0],
        )
        if self.sae.multi_topk:
            self.log("train/multi_topk_nmse", out.multi_topk_nmse.detach(), on_step=True, batch_size=x.shape[0])
        if out.dead_margin is not None:
            # Where AuxK's dead latents stand against the firing threshold (<= 0): the median
            # token, and the best one. Moving toward 0 means AuxK is reviving them.
            self.log_dict({"train/dead_margin_median": out.dead_margin.median(),
                           "train/dead_margin_max": out.dead_margin.max()},
                          on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def _log_throughput(self, batch_tokens: int) -> None:
        """train/tokens_per_sec over the steps since the last log (all ranks' tokens)."""
        now, step = time.perf_counter(), self.global_step
        last = getattr(self, "_throughput_mark", None)
        self._throughput_mark = (now, step)
        if last is not None and step > last[1]:
            self.log("train/tokens_per_sec", (step - last[1]) * batch_tokens / (now - last[0]),
                     on_step=True, on_epoch=False, batch_size=batch_tokens)

    @torch.no_grad()
    def _dead_fraction(self) -> Tensor:
        dead = (self.tokens_since_fired >= self.hparams.dead_tokens).sum().float()
        if self.sharded:
            self.sae.comm.all_reduce_([dead])
        return dead / self.sae.num_latents

    @torch.no_grad()
    def _track_firing(self, values: Tensor, indices: Tensor, batch_tokens: int) -> None:
        fired = indices[values > 0]
        world = self._replicas()
        if self.sharded:
            # Global ids in, this shard's counters out; summed over the replicas.
            lo, hi = self.sae.lo, self.sae.hi
            counts = torch.bincount(fired[(fired >= lo) & (fired < hi)] - lo, minlength=self.sae.num_local).float()
            if self._replica_group is not None:
                dist.all_reduce(counts, group=self._replica_group)
        else:
            counts = torch.bincount(fired, minlength=self.sae.num_latents).float()
            if world > 1:
                counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.tokens_since_fired += batch_tokens * world
        self.tokens_since_fired[counts > 0] = 0
        self.tokens_seen += batch_tokens * world
        self.fire_counts += counts.to(torch.int64)
        self.fire_window += counts
        self._window_tokens += batch_tokens * world
        every = self.hparams.histogram_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            window = self.sae.comm.all_gather(self.fire_window).reshape(-1) if self.sharded else self.fire_window
            self._log_density(window / max(self._window_tokens, 1), "train/latent_density")
            self.fire_window.zero_()
            self._window_tokens = 0

    def _log_density(self, freq: Tensor, tag: str) -> None:
        logger = self.logger
        if logger is None or not self.trainer.is_global_zero or not hasattr(logger.experiment, "add_histogram"):
            return
        # log10 firing frequency; never-fired latents pile up at -10.
        logger.experiment.add_histogram(tag, torch.log10(freq.float().cpu() + 1e-10), self.global_step)

    def on_before_backward(self, loss: Tensor) -> None:
        # Before backward, so no NaN reaches the weights or a checkpoint (one host sync a step).
        # Every rank decides together: a rank stopping alone would leave the others waiting in
        # the gradient all-reduce.
        finite = bool(torch.isfinite(loss.detach()))
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise FloatingPointError(
                f"train/loss is {loss.item() if not torch.isfinite(loss) else 'not finite on another rank'} at step "
                f"{self.global_step}: training stopped before the weights were "
                f"updated. Non-finite input activations (see the cache manifest's nonfinite_tokens) or a learning rate "
                f"too high (lr={self.lr:.3g}) cause this; resume from the last checkpoint with a lower --model.lr."
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._replica_group is not None:
            self._average_gradients_over_replicas()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        if self.hparams.dead_adam_reset:
            self._reset_adam_of_newly_dead(optimizer)

    @torch.no_grad()
    def _reset_adam_of_newly_dead(self, optimizer) -> None:
        """Zero the Adam moments of the latents that died with this batch (the ablation
        dead_adam_reset): their rows in W_enc, b_enc and W_dec."""
        dead = self.tokens_since_fired >= self.hparams.dead_tokens
        was = getattr(self, "_dead_before", None)
        self._dead_before = dead.clone()
        if was is None:
            return
        rows = (dead & ~was).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        for p in (self.sae.W_enc, self.sae.b_enc, self.sae.W_dec):
            state = getattr(optimizer, "optimizer", optimizer).state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0

    @torch.no_grad()
    def _average_gradients_over_replicas(self) -> None:
        """Data parallelism of a latent-sharded SAE: what DDP does for a whole one (every
        parameter gets a gradient each step; one flat all-reduce)."""
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._replica_group)
        flat /= self._num_replicas
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        algorithm = gradient_clip_algorithm or (self._trainer.gradient_clip_algorithm if self._trainer else None)
        if self.sharded and gradient_clip_val and str(getattr(algorithm, "value", algorithm) or "norm") == "norm":
            self.sae.clip_grad_norm_(float(gradient_clip_val))  # the norm over all shards
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.set_decoder_norm_to_unit_norm()
        if self.weight_ema is not None:
            self.weight_ema.update(self.sae)

    def configure_optimizers(self):
        hp = self.hparams
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=tuple(hp.betas), eps=hp.eps, **fused)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        total = total if total and math.isfinite(total) else 0

        def factor(step: int) -> float:
            if hp.warmup_steps and step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_decay == "none" or not total:
                return 1.0
            start = max(int(hp.decay_start * total), hp.warmup_steps)
            if step < start:
                return 1.0
            frac = min((step - start) / max(total - start, 1), 1.0)
            return 1.0 - frac if hp.lr_decay == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: Tensor) -> None:
        x = acts_of(batch)
        if x.shape[0] == 0:
            return  # padding that keeps the validation batch count equal across ranks
        recon, (values, indices) = self.eval_sae.encode_decode(x)
        self.val_nmse.update(x, recon)
        self.val_l0.update(values)
        self.val_firing.update(values, indices)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics()

    def _log_eval_metrics(self) -> None:
        nmse = self.val_nmse.compute()
        if (isinstance(self.logger, TensorBoardLogger) and not self.trainer.sanity_checking
                and not getattr(self, "_hp_metric_declared", False) and self.trainer.is_global_zero):
            _declare_hparams_metric(self.logger, self.hparams, {"val/nmse": float(nmse)})
            self._hp_metric_declared = True
        freq = self.val_firing.frequencies()
        self.log_dict(
            {"val/nmse": nmse, "val/explained_variance": 1 - nmse, "val/l0": self.val_l0.compute(),
             "val/dead_frac": self.val_firing.compute()},
            sync_dist=False,  # already reduced by the metrics' own sum states
        )
        if not self.trainer.sanity_checking:
            self._log_density(freq, "val/latent_density")
        for m in (self.val_nmse, self.val_l0, self.val_firing):
            m.reset()

    # ------------------------------------------------------------------ persistence
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sae_lit_export_metadata"] = self.export_metadata

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.export_metadata = checkpoint.get("sae_lit_export_metadata", {})
        # Checkpoints from before the firing counts: start them at zero (no densities to export).
        checkpoint.get("state_dict", {}).setdefault("fire_counts", torch.zeros_like(self.fire_counts))
        saved = checkpoint.get("hyper_parameters")
        if not saved:
            return
        safe, unsafe = split_changes(changes(saved, dict(self.hparams)))
        if unsafe:
            raise ResumeMismatchError(mismatch_message(unsafe))
        if safe:
            rank_zero_info("Resuming with changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in safe.items()))
        old_lr = saved.get("lr") or default_lr(int(saved.get("sae", {}).get("num_latents", self.sae.num_latents)))
        if old_lr != self.lr:
            _rescale_lr(checkpoint, self.lr / old_lr)

    def export_info(self) -> dict:
        """What the export records beyond the data's metadata: this package's version, the
        training tokens, and each latent's firing density over training (None before any)."""
        tokens = int(self.tokens_seen)
        density = (self.fire_counts.double() / tokens).float().cpu() if tokens else None
        return {"metadata": {**self.export_metadata, "sae_lit_version": package_version(), "training_tokens": tokens},
                "density": density}

    def export(self, out: str | Path, format: ExportFormat = "saelens") -> Path:
        """Write the SAE that validates (the EMA weights when kept) as ``format``."""
        info = self.export_info()
        return export_sae(self.eval_sae, out, metadata=info["metadata"], format=format,
                          density=info["density"] if format == "saelens" else None)

    def on_validation_epoch_start(self) -> None:
        self.sae.release_buffers()

    def on_train_end(self) -> None:
        self.sae.release_buffers()

    def on_fit_end(self) -> None:
        root = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: all ranks
        root = self.trainer.strategy.broadcast(root)  # the same folder for every shard
        if self.sharded:
            # Replica 0's shards stream their rows to global rank 0, which writes the folder.
            out = None
            if self.trainer.strategy.replica_rank == 0:
                info = self.export_info()
                out = export_sharded(self.eval_sae, Path(root) / "sae", metadata=info["metadata"],
                                     density=info["density"])
        elif self.trainer.is_global_zero:
            out = self.export(Path(root) / "sae")
        if not self.trainer.is_global_zero:
            return
        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if final:
            print("Final validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))
        print(f"Exported SAE to {out}")


class WeightEMA(nn.Module):
    """An exponential moving average of an SAE's parameters, as the reference code keeps it:
    the average starts at zero and is divided by 1 - decay^t when used (bias correction), so
    that early in training it is not dominated by the random init.

    Buffers (saved in checkpoints, so that a resumed run continues the same average): the
    running sums, one per parameter, and the number of updates.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            self.register_buffer(_buffer_name(name), torch.zeros_like(p.detach()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _sums(self) -> list[Tensor]:
        return [getattr(self, _buffer_name(n)) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self._sums(), [p.detach() for p in model.parameters()], 1.0 - self.decay)
        self.steps += 1

    @torch.no_grad()
    def write_to(self, target: nn.Module, source: nn.Module) -> None:
        """Set ``target``'s parameters to the bias-corrected average and its buffers to
        ``source``'s (e.g. BatchTopK's inference threshold), decoder rows at unit norm."""
        correction = 1.0 - self.decay ** int(self.steps)
        for p, s in zip(target.parameters(), self._sums()):
            torch.div(s, correction, out=p.data)
        for b_t, b in zip(target.buffers(), source.buffers()):
            b_t.copy_(b)
        target.set_decoder_norm_to_unit_norm()


def _declare_hparams_metric(logger: TensorBoardLogger, params: dict, metrics: dict) -> None:
    """Write TensorBoard's hparams summary naming ``metrics`` as the run's measures, without
    adding a point to their scalar series (TensorBoardLogger.log_hyperparams would)."""
    from torch.utils.tensorboard.summary import hparams

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", dict(params))
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, metrics):
        writer.add_summary(summary)


def _count(n: int) -> str:
    """1234567 -> '1.23M', 66100 -> '66.1k'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _buffer_name(param_name: str) -> str:
    return "avg_" + param_name.replace(".", "_")


def package_version() -> str:
    try:
        return importlib.metadata.version("sae_lit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _rescale_lr(checkpoint: dict, ratio: float) -> None:
    """Scale the learning rate stored in a checkpoint's optimizer and scheduler states (which
    the restore would otherwise put back over a changed lr)."""
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
    for sched in checkpoint.get("lr_schedulers", []):
        for key in ("base_lrs", "_last_lr"):
            if key in sched:
                sched[key] = [lr * ratio for lr in sched[key]]
