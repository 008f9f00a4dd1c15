"""Two-process DDP on CPU (gloo): ranks stay in lockstep and split-level metrics reduce
to what one process computes on the same data."""
import lightning as L
import pytest
import torch

from sae_lit.training.module import SAEModule
from sae_lit.data.synthetic import SyntheticActivationDataModule
from conftest import sae_module


class _DumpPerRank(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {"state": {k: v.cpu() for k, v in pl_module.state_dict().items()},
             "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


def _module():
    return sae_module(d_in=32, num_latents=128, k=4, dead_tokens=1024, lr=2e-3, warmup_steps=2, seed=0)


def _dm():
    return SyntheticActivationDataModule(d_in=32, num_features=128, batch_size=256, val_batches=4)


@pytest.mark.slow
def test_ddp_two_processes_match(tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=12, val_check_interval=12,
        check_val_every_n_epoch=None, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False,
        callbacks=[_DumpPerRank(tmp_path)],
    )
    trainer.fit(_module(), _dm())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, a in r0["state"].items():
        torch.testing.assert_close(a, r1["state"][name], msg=lambda m: f"{name} differs across ranks: {m}")
    # each rank fired-latent counter saw the global batch (2 x 256 tokens per step)
    assert int(r0["state"]["tokens_seen"]) == 12 * 2 * 256
    assert r0["metrics"]["val/nmse"] == pytest.approx(r1["metrics"]["val/nmse"])

    # One process, the same final weights, the whole validation split.
    single = _module()
    single.load_state_dict(r0["state"])
    t1 = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = t1.validate(single, _dm(), verbose=False)[0]
    for key in ("val/nmse", "val/l0", "val/dead_frac"):
        assert metrics[key] == pytest.approx(r0["metrics"][key], rel=1e-5, abs=1e-7), key
