"""SAEModule under LatentParallelStrategy (gloo, CPU processes launched as torchrun would):
training equals one process, sharded checkpoints resume exactly (also with more replicas),
and the export, live or from a checkpoint folder, equals the one-process export."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from conftest import sae_module
from distributed import spawn
from sae_lit.data.synthetic import SyntheticActivationDataModule
from sae_lit.training.export import export_checkpoint
from sae_lit.training.strategies import INDEX_NAME, LatentParallelStrategy, shard_file

pytestmark = pytest.mark.slow
N, STEPS = 128, 20


class _Float64(SyntheticActivationDataModule):
    """float64 batches: with a float64 SAE, runs agree to rounding (ModelParallelStrategy
    refuses precision="64-true", so the module is converted by hand)."""

    def make_batch(self, seed, n=None):
        return super().make_batch(seed, n).double()

    def init_sample(self, n=32768):
        return super().init_sample(n).double()


def _module():
    m = sae_module(d_in=32, num_latents=N, k=4, k_aux=16, dead_tokens=256, lr=3e-3, warmup_steps=2, ema_decay=0.9,
                   multi_topk=True, seed=0)
    with torch.no_grad():
        m.sae.b_enc[: N // 4] -= 50.0  # a quarter starts dead: AuxK acts from step 2 on
    return m.double()


def _dm():
    return _Float64(d_in=32, num_features=128, batch_size=128, val_batches=4)


class _Dump(L.Callback):
    """Saves the module's state (and, at train start, the optimizer's) per rank."""

    def __init__(self, path_fmt: str):
        self.path_fmt = path_fmt

    def _save(self, trainer, pl_module, when):
        state = {"state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                 "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
        if when == "start":
            state["optimizer"] = trainer.optimizers[0].state_dict()
        torch.save(state, self.path_fmt.format(when=when, rank=trainer.global_rank))

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")


def _fit(root, steps, strategy, devices, ckpt=None, every=10):
    L.seed_everything(0)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    callbacks = [_Dump(str(root / "{when}-rank{rank}.pt")),
                 L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, val_check_interval=steps,
        check_val_every_n_epoch=None, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
        logger=False, gradient_clip_val=0.05, log_every_n_steps=5, callbacks=callbacks,
    )
    trainer.fit(_module(), _dm(), ckpt_path=ckpt)


def _sharded_worker(rank, world, root):
    _fit(Path(root) / "straight", STEPS, LatentParallelStrategy(latent_shards=2, replicas=1), 2)
    ckpt = Path(root) / "straight" / "ckpt" / "epoch=0-step=10.ckpt"
    _fit(Path(root) / "resumed", STEPS, LatentParallelStrategy(latent_shards=2, replicas=1), 2, ckpt=str(ckpt))


def _two_replica_worker(rank, world, root, ckpt):
    _fit(Path(root) / "mesh", 14, LatentParallelStrategy(latent_shards=2, replicas=2), 4, ckpt=ckpt, every=100)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_parallel")
    spawn(_sharded_worker, 2, str(root), init_group=False)
    _fit(root / "single", STEPS, "auto", 1)
    return root


def _load(path):
    return torch.load(path, weights_only=False)


def _joined(root: Path, when: str, shards=2) -> dict:
    """The shards' states put back together: latent-indexed tensors concatenated."""
    parts = [_load(root / f"{when}-rank{r}.pt")["state"] for r in range(shards)]
    out = {}
    for name, first in parts[0].items():
        if first.dim() >= 1 and name.startswith(("sae.W_", "sae.b_enc", "ema.W_", "ema.b_enc", "weight_ema.avg_W",
                                                 "weight_ema.avg_b_enc", "tokens_since_fired", "fire_counts")):
            out[name] = torch.cat([p[name] for p in parts])
        else:
            out[name] = first
    return out


def test_two_shards_train_like_one_process(runs):
    single = _load(runs / "single" / "end-rank0.pt")
    sharded = _joined(runs / "straight", "end")
    assert set(sharded) == set(single["state"])
    for name, want in single["state"].items():
        torch.testing.assert_close(sharded[name], want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    got = _load(runs / "straight" / "end-rank0.pt")["metrics"]
    for key in ("val/nmse", "val/l0", "val/dead_frac", "train/auxk", "train/dead_frac", "train/loss"):
        assert got[key] == pytest.approx(single["metrics"][key], rel=1e-9, abs=1e-12), key
    assert single["metrics"]["train/auxk"] > 0


def test_resume_from_a_sharded_checkpoint_is_exact(runs):
    ckpt = runs / "straight" / "ckpt" / "epoch=0-step=10.ckpt"
    assert json.loads((ckpt / INDEX_NAME).read_text())["num_shards"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([INDEX_NAME, shard_file(0, 2), shard_file(1, 2)])
    for r in range(2):
        a = _load(runs / "straight" / f"end-rank{r}.pt")["state"]
        b = _load(runs / "resumed" / f"end-rank{r}.pt")["state"]
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_exports_equal_the_one_process_export(runs, tmp_path):
    live = runs / "straight" / "sae"
    single = load_file(runs / "single" / "sae" / "sae_weights.safetensors")
    got = load_file(live / "sae_weights.safetensors")
    assert set(got) == set(single)
    for name in single:
        torch.testing.assert_close(got[name], single[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert json.loads((live / "cfg.json").read_text()) == json.loads((runs / "single" / "sae" / "cfg.json").read_text())
    # The firing densities over training, gathered from the shards.
    torch.testing.assert_close(load_file(live / "sparsity.safetensors")["sparsity"],
                               load_file(runs / "single" / "sae" / "sparsity.safetensors")["sparsity"])
    # From the checkpoint folder, shard by shard: the same file as the live export.
    out = export_checkpoint(str(runs / "straight" / "ckpt" / "epoch=0-step=20.ckpt"), str(tmp_path / "from_ckpt"))
    assert (out / "sae_weights.safetensors").read_bytes() == (live / "sae_weights.safetensors").read_bytes()
    assert (out / "cfg.json").read_text() == (live / "cfg.json").read_text()
    assert (out / "sparsity.safetensors").read_bytes() == (live / "sparsity.safetensors").read_bytes()


def test_more_replicas_resume_a_sharded_checkpoint(runs):
    """2 replicas x 2 shards resume the 1 x 2 run's step-10 checkpoint: every rank starts from
    its shard's weights, Adam moments and counters; the replicas stay in lockstep, and the
    counters see both replicas' batches."""
    root = runs / "replicas"
    ckpt = runs / "straight" / "ckpt" / "epoch=0-step=10.ckpt"
    spawn(_two_replica_worker, 4, str(root), str(ckpt), init_group=False)
    for rank in range(4):
        shard = rank % 2
        saved = torch.load(ckpt / shard_file(shard, 2), weights_only=False)
        start = _load(root / "mesh" / f"start-rank{rank}.pt")
        for name, value in saved["state_dict"].items():
            assert torch.equal(start["state"][name], value), (rank, name)
        for pid, st in saved["optimizer_states"][0]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(start["optimizer"]["state"][pid][key], st[key]), (rank, pid, key)
    for shard in range(2):
        a = _load(root / "mesh" / f"end-rank{shard}.pt")["state"]
        b = _load(root / "mesh" / f"end-rank{2 + shard}.pt")["state"]
        for name in a:
            assert torch.equal(a[name], b[name]), (shard, name)
    end = _load(root / "mesh" / "end-rank0.pt")
    assert int(end["state"]["tokens_seen"]) == 10 * 128 + 4 * 2 * 128
