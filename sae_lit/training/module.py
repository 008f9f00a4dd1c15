"""SAEModule: the LightningModule around TopKSAE — optimisation, dead-latent tracking,
logging, EMA and export. The SAE itself (sae.py) knows nothing of Lightning."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sae_lit.common import acts_of
from sae_lit.data.source import ActivationSource
from sae_lit.model import native
from sae_lit.training.metrics import NMSE, FiringCounts, MeanL0
from sae_lit.training.resume import ResumeMismatchError, changes, mismatch_message, split_changes
from sae_lit.model.sae import SAEConfig, TopKSAE


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
        """
        super().__init__()
        if isinstance(sae, TopKSAE):
            self.sae = sae
        else:
            self.sae = TopKSAE(SAEConfig.from_dict(sae) if isinstance(sae, dict) else sae)
        cfg = self.sae.cfg
        # save_hyperparameters reads the init arguments from this frame: saving the SAE's
        # config as a plain dict keeps hparams.yaml readable and lets a checkpoint rebuild the
        # SAE (an injected module is saved as its config + state dict).
        sae = dataclasses.asdict(cfg)
        self.save_hyperparameters()
        self.ema: TopKSAE | None = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self.sae).requires_grad_(False)
        self.lr = lr if lr is not None else default_lr(cfg.num_latents)
        n = cfg.num_latents
        # Training tokens since each latent last fired (value > 0 in the top k). Global over
        # ranks: every rank adds the global batch and resets on any rank's firing.
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("fire_window", torch.zeros(n), persistent=False)
        self._window_tokens = 0
        self.val_nmse = NMSE(cfg.d_in)
        self.val_l0 = MeanL0()
        self.val_firing = FiringCounts(n)
        self.export_metadata: dict = {}

    # ------------------------------------------------------------------ setup
    @property
    def eval_sae(self) -> TopKSAE:
        return self.ema if self.ema is not None else self.sae

    def on_fit_start(self) -> None:
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

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = acts_of(batch)
        hp = self.hparams
        act = self.sae.act
        auxk_on = hp.auxk_alpha > 0 and (act is None or act.supports_auxk)
        dead = self.tokens_since_fired >= hp.dead_tokens
        out = self.sae(x, dead_mask=dead if auxk_on else None)
        loss = out.nmse + out.extra_loss
        if auxk_on:
            loss = loss + hp.auxk_alpha * out.auxk_loss
        if self.sae.multi_topk and act is None:
            loss = loss + out.multi_topk_nmse / 8
        if act is not None and act.uses_l1:
            loss = loss + hp.l1_coeff * out.l1_loss
            self.log("train/l1", out.l1_loss.detach(), on_step=True, batch_size=x.shape[0])
        self._track_firing(out.values.detach(), out.indices, x.shape[0])

        l0 = (out.values.detach() > 0).sum(-1).float().mean()
        self.log_dict(
            {"train/loss": loss.detach(), "train/nmse": out.nmse.detach(), "train/auxk": out.auxk_loss.detach(),
             "train/l0": l0, "train/dead_frac": dead.float().mean(),
             "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]},
            on_step=True, on_epoch=False, batch_size=x.shape[0],
        )
        if self.sae.multi_topk:
            self.log("train/multi_topk_nmse", out.multi_topk_nmse.detach(), on_step=True, batch_size=x.shape[0])
        return loss

    @torch.no_grad()
    def _track_firing(self, values: Tensor, indices: Tensor, batch_tokens: int) -> None:
        counts = torch.bincount(indices[values > 0], minlength=self.sae.num_latents).float()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.tokens_since_fired += batch_tokens * world
        self.tokens_since_fired[counts > 0] = 0
        self.tokens_seen += batch_tokens * world
        self.fire_window += counts
        self._window_tokens += batch_tokens * world
        every = self.hparams.histogram_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self._log_density(self.fire_window / max(self._window_tokens, 1), "train/latent_density")
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
        self.sae.remove_gradient_parallel_to_decoder_directions()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.set_decoder_norm_to_unit_norm()
        if self.ema is not None:
            with torch.no_grad():
                ema_p, p = list(self.ema.parameters()), list(self.sae.parameters())
                torch._foreach_lerp_(ema_p, p, 1.0 - self.hparams.ema_decay)
                for b_ema, b in zip(self.ema.buffers(), self.sae.buffers()):
                    b_ema.copy_(b)  # e.g. BatchTopK's inference threshold
                self.ema.set_decoder_norm_to_unit_norm()

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

    def on_validation_epoch_start(self) -> None:
        self.sae.release_buffers()

    def on_train_end(self) -> None:
        self.sae.release_buffers()

    def on_fit_end(self) -> None:
        root = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: all ranks
        if not self.trainer.is_global_zero:
            return
        from sae_lit.model.formats import export_sae

        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if final:
            print("Final validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())))

        out = export_sae(self.eval_sae, Path(root) / "sae", metadata=self.export_metadata)
        print(f"Exported SAE to {out}")


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
