"""SAEModule through a real Lightning Trainer on synthetic activations."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from sae_lit.model.formats import export_sae, load_sae
from sae_lit.training.module import SAEModule, default_lr
from sae_lit.data.synthetic import SyntheticActivationDataModule
from conftest import make_datamodule, sae_module


def _trainer(tmp_path, max_steps=30, **kw):
    kw.setdefault("val_check_interval", max_steps)
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, check_val_every_n_epoch=None,
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=5, gradient_clip_val=1.0, **kw,
    )


def _module(**kw):
    kw = {"num_latents": 256, "k": 8, "dead_tokens": 4096, "warmup_steps": 5, "lr": 2e-3, "histogram_every_n_steps": 20, **kw}
    return sae_module(d_in=32, **kw)


def _dm(**kw):
    return SyntheticActivationDataModule(d_in=32, num_features=256, batch_size=512, **kw)


def test_default_lr_scales_inverse_sqrt():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(2**16) == pytest.approx(1e-4)


def test_fit_reduces_nmse_keeps_invariants_and_exports(tmp_path):
    torch.manual_seed(0)
    model, dm = _module(), _dm()
    trainer = _trainer(tmp_path, max_steps=60)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert m["val/nmse"] < 0.5, m
    assert m["val/explained_variance"] == pytest.approx(1 - m["val/nmse"].item())
    assert m["val/l0"] <= 8
    torch.testing.assert_close(model.sae.W_dec.norm(dim=1), torch.ones(256))
    assert bool(model.sae.initialized)
    out = Path(trainer.log_dir) / "sae"
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    # TensorBoard got the metrics named in DESIGN.md
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(trainer.log_dir)).Reload()
    tags = set(ev.Tags()["scalars"])
    for t in ["train/loss", "train/nmse", "train/auxk", "train/l0", "train/dead_frac",
              "val/nmse", "val/explained_variance", "val/l0", "val/dead_frac"]:
        assert t in tags, (t, tags)
    assert "train/latent_density" in ev.Tags()["histograms"]


def test_dead_latents_counted_and_revived_by_auxk(tmp_path):
    model, dm = _module(dead_tokens=1024), _dm()
    with torch.no_grad():  # kill half the latents: they never win the top-k
        model.sae.b_enc[:128] = -1e3
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(model, dm)
    assert (model.tokens_since_fired[:128] >= 1024).all()
    assert trainer.callback_metrics["train/dead_frac"] >= 0.5
    assert trainer.callback_metrics["train/auxk"] > 0


def test_export_takes_raw_activations_and_round_trips(tmp_path):
    model, dm = _module(), _dm()
    _trainer(tmp_path, max_steps=10).fit(model, dm)
    sae = model.sae
    x = dm.make_batch(123)
    out = export_sae(sae, tmp_path / "exp", metadata={"model_name": "m", "hook_name": "h"})
    # SAELens conventions, computed by hand from the files: x - b_dec, @ W_enc + b_enc,
    # top-k then ReLU, @ W_dec + b_dec.
    from safetensors.torch import load_file

    w = load_file(str(out / "sae_weights.safetensors"))
    cfg = json.loads((out / "cfg.json").read_text())
    assert w["W_enc"].shape == (32, 256) and w["W_dec"].shape == (256, 32)
    assert w["b_enc"].shape == (256,) and w["b_dec"].shape == (32,)
    for key in ["architecture", "d_in", "d_sae", "k", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "metadata"]:
        assert key in cfg
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True
    torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.ones(256))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(cfg["k"], dim=-1)
    recon_file = torch.zeros_like(pre).scatter(1, i, v.relu()) @ w["W_dec"] + w["b_dec"]
    # our model on normalised inputs, mapped back to raw space
    x_n = x * sae.input_scale
    v2, i2 = sae.select(sae.pre_acts(x_n))
    recon_model = sae.decode(v2, i2) / sae.input_scale
    torch.testing.assert_close(recon_file, recon_model, rtol=1e-4, atol=1e-4)
    loaded = load_sae(out)
    torch.testing.assert_close(loaded.reconstruct(x), recon_model, rtol=1e-4, atol=1e-4)


def test_export_cli_from_checkpoint(tmp_path):
    from sae_lit.training.export import main

    model, dm = _module(), _dm()
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(model, dm)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    main([str(ckpt), str(tmp_path / "out")])
    loaded = load_sae(tmp_path / "out")
    x = dm.make_batch(5)
    torch.testing.assert_close(loaded.reconstruct(x), model.sae.reconstruct(x), rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]["model_name"] == "synthetic"


def test_resume_gives_identical_weights_and_counters(tmp_path):
    def run(steps, ckpt=None, root=tmp_path / "a"):
        L.seed_everything(0)
        model, dm = _module(dead_tokens=2048), _dm()
        trainer = _trainer(root, max_steps=steps, val_check_interval=10)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, trainer

    straight, _ = run(20, root=tmp_path / "straight")
    first, t1 = run(10, root=tmp_path / "first")
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    resumed, _ = run(20, ckpt=str(ckpt), root=tmp_path / "resumed")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
    assert straight.tokens_seen == resumed.tokens_seen == 20 * 512


def test_ema_weights_used_for_validation(tmp_path):
    model, dm = _module(ema_decay=0.9), _dm()
    _trainer(tmp_path, max_steps=10).fit(model, dm)
    assert model.eval_sae is model.ema
    assert not torch.equal(model.ema.W_enc, model.sae.W_enc)
    torch.testing.assert_close(model.ema.W_dec.norm(dim=1), torch.ones(256))


def test_multi_topk_and_relu_baseline_train(tmp_path):
    for kw in ({"multi_topk": True}, {"activation": "relu", "l1_coeff": 1e-3}):
        model, dm = _module(**kw), _dm()
        trainer = _trainer(tmp_path, max_steps=10)
        trainer.fit(model, dm)
        assert torch.isfinite(trainer.callback_metrics["val/nmse"])


def test_resume_on_a_real_cache_is_exact(cache_kwargs, tmp_path):
    """The activation stream fast-forwards on resume: interrupted + resumed == uninterrupted."""
    from sae_lit.data.datamodule import ActivationDataModule

    make_datamodule(cache_kwargs, progress=False).prepare_data()

    def run(steps, root, ckpt=None):
        L.seed_everything(0)
        dm = make_datamodule(cache_kwargs, batch_size=32, shuffle_buffer=64, progress=False)
        model = sae_module(d_in=dm.d_in, num_latents=64, k=4, dead_tokens=256, lr=2e-3, warmup_steps=2)
        trainer = _trainer(root, max_steps=steps, val_check_interval=4)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, trainer

    straight, _ = run(8, tmp_path / "s")
    _, t1 = run(4, tmp_path / "a")
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = run(8, tmp_path / "b", ckpt=str(tmp_path / "half.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_ema_starts_at_zero_and_is_bias_corrected_as_the_reference(tmp_path):
    """After t steps the EMA equals sum_s (1 - b) b^(t - s) p_s / (1 - b^t), the reference
    code's average of the weights p_1 ... p_t after each step, not a blend with the init."""
    beta, steps = 0.9, 6
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append({k: v.detach().clone() for k, v in pl_module.sae.named_parameters()})

    model, dm = _module(ema_decay=beta), _dm()
    trainer = _trainer(tmp_path, max_steps=steps, callbacks=[Record()], limit_val_batches=0)
    trainer.fit(model, dm)
    assert len(snapshots) == steps
    ema = model.eval_sae
    assert ema is model.ema
    for name, value in ema.named_parameters():
        expect = sum((1 - beta) * beta ** (steps - 1 - s) * snapshots[s][name] for s in range(steps))
        expect = expect / (1 - beta**steps)
        if name == "W_dec":
            expect = expect / expect.norm(dim=1, keepdim=True)  # the eval copy keeps unit-norm rows
        torch.testing.assert_close(value, expect, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_dead_adam_reset_zeroes_the_moments_of_latents_that_die():
    model = _module(dead_adam_reset=True, dead_tokens=100, num_latents=16, k=2)
    opt = torch.optim.Adam(model.sae.parameters())
    params = (model.sae.W_enc, model.sae.b_enc, model.sae.W_dec)
    for p in params:
        opt.state[p] = {"exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
    model.tokens_since_fired[:] = 0
    model.tokens_since_fired[[3, 5]] = 150  # already dead at the first look
    model._reset_adam_of_newly_dead(opt)   # first look: remembers who is dead, resets nothing
    model.tokens_since_fired[[7, 9]] = 100  # die now
    model._reset_adam_of_newly_dead(opt)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            s = opt.state[p][key]
            assert s[[7, 9]].abs().max() == 0, (p.shape, key)
            assert (s[[0, 3, 5, 8]] == 1).all(), (p.shape, key)
