"""Faults while training: a non-finite loss, NaN weights at export, resuming with other model
arguments, a full disk while checkpointing, a pickle payload in a checkpoint."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import sae_module, tiny_cache_kwargs
from faults import temp_files, write_fit_config
from sae_lit.data.cache import CacheConfig, build_cache
from sae_lit.data.synthetic import SyntheticActivationDataModule
from sae_lit.model.formats import export_sae
from sae_lit.model.sae import TopKSAE
from sae_lit.training import checkpoint as ckpt_io
from sae_lit.training.checkpoint import AtomicCheckpointIO
from sae_lit.training.cli import cli_main
from sae_lit.training.resume import ResumeMismatchError


def _module(**kw):
    kw = {"num_latents": 64, "k": 4, "dead_tokens": 4096, "warmup_steps": 2, "lr": 2e-3, "histogram_every_n_steps": 0,
          **kw}
    return sae_module(d_in=16, **kw)


class _PoisonedData(SyntheticActivationDataModule):
    """Synthetic activations with a NaN in the training batch of step `at`."""

    def __init__(self, at: int, **kw):
        super().__init__(d_in=16, num_features=64, batch_size=128, **kw)
        self.at = at

    def train_dataloader(self):
        def batches():
            for i, x in enumerate(super(_PoisonedData, self).train_dataloader()):
                if i == self.at:
                    x = x.clone()
                    x[3, 5] = float("nan")
                yield x

        return batches()


def _trainer(root, max_steps, every=1, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=max_steps, check_val_every_n_epoch=None,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[ModelCheckpoint(dirpath=Path(root) / "ckpt", every_n_train_steps=every, save_last=True, save_top_k=-1)],
        plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0, **kw,
    )


# --- non-finite loss and weights ---------------------------------------------------------------------


def test_nonfinite_loss_stops_training_before_the_weights_change(tmp_path):
    model = _module()
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at step 5.*lower --model.lr"):
        _trainer(tmp_path, max_steps=10).fit(model, _PoisonedData(at=5))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved and all(torch.isfinite(torch.load(c, weights_only=True)["state_dict"]["sae.W_enc"]).all() for c in saved)
    assert not (tmp_path / "sae").exists()  # no export of a broken run


def test_export_refuses_nonfinite_weights(tmp_path):
    sae = TopKSAE(16, 64, k=4, normalize="none")
    with torch.no_grad():
        sae.W_dec[3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"Refusing to export.*W_dec.*NaN/Inf"):
        export_sae(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- resuming with other model arguments -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A finished 8-step CLI run on the tiny cache: (fit config, its last checkpoint)."""
    root = tmp_path_factory.mktemp("run")
    kwargs = tiny_cache_kwargs(root / "cache", tiny_model_dir, tiny_corpus)
    build_cache(CacheConfig(**kwargs), progress=False)
    config = write_fit_config(root / "fit.yaml", kwargs, root / "logs", max_steps=8, every=4)
    cli_main(["fit", "--config", str(config)])
    return config, next((root / "logs").rglob("last.ckpt"))


@pytest.mark.parametrize("flags,named", [
    (["--model.sae.num_latents", "512"], "model.sae.num_latents: checkpoint"),
    (["--model.sae.k", "8", "--model.ema_decay", "0.99"], "model.ema_decay"),
    (["--model.sae.activation", "relu"], "model.sae.activation"),
])
def test_resume_with_other_model_arguments_is_an_error_naming_them(trained, tmp_path, flags, named):
    """Issue case 5: --model.num_latents 512 from a 64-latent run trained and exported 64."""
    config, last = trained
    with pytest.raises(ResumeMismatchError) as e:
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(last), f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.max_steps=12", *flags])
    assert named in str(e.value) and str(last) in str(e.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before anything ran


def test_resume_with_a_safe_change_applies_it(trained, tmp_path, capsys):
    config, last = trained
    cli_main(["fit", "--config", str(config), "--ckpt_path", str(last), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.max_steps=12", "--model.lr=0.0005", "--model.warmup_steps=3"])
    new = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert new["hyper_parameters"]["lr"] == 0.0005 and new["lr_schedulers"][0]["base_lrs"] == [0.0005]
    assert new["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0005)
    assert new["global_step"] == 12


def test_resume_without_flags_takes_the_checkpoint_as_it_is(trained, tmp_path):
    config, last = trained
    cli = cli_main(["fit", "--config", str(config), "--ckpt_path", str(last), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.max_steps=10"])
    assert cli.model.sae.num_latents == 64 and cli.trainer.global_step == 10


def test_python_api_resume_mismatch_is_named(tmp_path):
    dm = SyntheticActivationDataModule(d_in=16, num_features=64, batch_size=128)
    trainer = _trainer(tmp_path / "a", max_steps=4)
    trainer.fit(_module(), dm)
    with pytest.raises(ResumeMismatchError, match=r"sae\.k: the checkpoint has 4, this run asks for 8"):
        _trainer(tmp_path / "b", max_steps=8).fit(_module(k=8), dm, ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"))


# --- a full disk while checkpointing; unpickling --------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Issue case 6: ENOSPC left a truncated checkpoint under its final name."""
    saves = []

    class FullDisk:
        def __init__(self, path, mode):
            self.f = open(path, mode)  # noqa: SIM115

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        saves.append(path)
        return FullDisk(path, mode) if len(saves) > 3 else open(path, mode, *a, **kw)  # noqa: SIM115

    monkeypatch.setattr(ckpt_io, "open", fake_open, raising=False)
    dm = SyntheticActivationDataModule(d_in=16, num_features=64, batch_size=128)
    with pytest.raises(OSError, match="No space left.*are intact"):
        _trainer(tmp_path, max_steps=10, every=2).fit(_module(), dm)
    monkeypatch.undo()
    assert temp_files(tmp_path) == []
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # complete, loadable
    assert last["global_step"] in (2, 4)
    # ... and resuming from it finishes the run.
    trainer = _trainer(tmp_path, max_steps=10, every=2)
    trainer.fit(_module(), dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 10


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickle_payload_in_a_checkpoint_does_not_run(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Payload()}, f)
    from sae_lit.training.export import main

    with pytest.raises(pickle.UnpicklingError):
        main([str(bad), str(tmp_path / "out")])
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(bad)
    assert not _Payload.marker.exists()
