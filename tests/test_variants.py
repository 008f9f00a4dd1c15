"""The activation variants (activations.py): each against its definition, each through the
module and the export; and the ablation switches for the paper's training tricks."""
from pathlib import Path

import lightning as L
import pytest
import torch

from sae_lit.model import losses
from sae_lit.model.activations import DENSE_ACTIVATIONS, LOADED_ONLY, default_prefixes
from sae_lit.model.formats import export_sae, load_sae
from sae_lit.training.module import SAEModule
from sae_lit.model.sae import TopKSAE
from sae_lit.data.synthetic import SyntheticActivationDataModule
from conftest import sae_module


def _sae(activation, n=64, d=16, k=4, **kw):
    torch.manual_seed(0)
    x = torch.randn(512, d) * 2 + 0.5
    sae = TopKSAE(d, n, k, activation=activation, seed=0, **kw)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae, x


def test_prolu_definition_and_gradients():
    sae, x = _sae("prolu")
    x_norm, _ = sae.normalize_input(x)
    m = (x_norm - sae.b_dec) @ sae.W_enc.t()
    gate = (m > 0) & (m + sae.b_enc > 0)
    out = sae(x)
    torch.testing.assert_close(out.values, torch.where(gate, m, torch.zeros_like(m)))
    # b_enc only gates: its gradient is the gradient of the open entries (as if ReLU(m + b)).
    g = torch.randn_like(out.values)
    (out.values * g).sum().backward()
    torch.testing.assert_close(sae.b_enc.grad, (g * gate).sum(0))


def test_gated_gate_loss_trains_encoder_not_decoder():
    sae, x = _sae("gated")
    with torch.no_grad():
        sae.act.r_mag.normal_(0, 0.2)
        sae.act.b_mag.normal_(0, 0.2)
    x_norm, _ = sae.normalize_input(x)
    xc = x_norm - sae.b_dec
    pi = xc @ sae.W_enc.t() + sae.b_enc
    mag = (xc @ (sae.W_enc * sae.act.r_mag.exp()[:, None]).t() + sae.act.b_mag).relu()
    out = sae(x)
    torch.testing.assert_close(out.values, (pi > 0).float() * mag)
    torch.testing.assert_close(out.l1_loss, pi.relu().sum(-1).mean())  # unit-norm decoder rows
    out.extra_loss.backward()
    assert sae.W_dec.grad is None and sae.W_enc.grad.abs().sum() > 0
    expect = losses.nmse(x_norm, pi.relu() @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.extra_loss.detach(), expect.detach())


def test_batchtopk_selects_b_times_k_and_infers_with_threshold():
    sae, x = _sae("batchtopk", k=4)
    out = sae(x)
    assert int((out.values > 0).sum()) == 4 * x.shape[0]
    per_token = (out.values > 0).sum(-1)
    assert per_token.min() != per_token.max()  # varies per token, k on average
    theta = float(sae.act.threshold)
    x_norm, _ = sae.normalize_input(x)
    pre = (x_norm - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    assert theta == pytest.approx(float(pre.relu().flatten().topk(4 * x.shape[0]).values.min()), rel=1e-5)
    sae.eval()
    v, i = sae.encode(x)
    dense = torch.zeros(x.shape[0], 64).scatter_(1, i, v)
    torch.testing.assert_close(dense, torch.where(pre > theta, pre, torch.zeros_like(pre)))


def test_matryoshka_loss_is_sum_over_nested_prefixes():
    sae, x = _sae("matryoshka", n=64, matryoshka_prefixes=[8, 32])
    out = sae(x)
    x_norm, _ = sae.normalize_input(x)
    z = out.values
    expect = sum(losses.nmse(x_norm, z[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in (8, 32))
    torch.testing.assert_close(out.extra_loss, expect)
    torch.testing.assert_close(out.nmse, losses.nmse(x_norm, z @ sae.W_dec + sae.b_dec))
    assert default_prefixes(4096) == [128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("activation", ["topk", *(a for a in DENSE_ACTIVATIONS if a not in LOADED_ONLY)])
def test_variant_trains_logs_and_exports(activation, tmp_path):
    torch.manual_seed(0)
    model = sae_module(
        d_in=32, num_latents=128, k=8, activation=activation, l1_coeff=0.02, dead_tokens=2048,
        warmup_steps=5, lr=2e-3, histogram_every_n_steps=10,
    )
    dm = SyntheticActivationDataModule(d_in=32, num_features=128, batch_size=256)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=40, val_check_interval=40, check_val_every_n_epoch=None,
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
    )
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    for key in ("val/nmse", "val/l0", "val/dead_frac", "train/nmse"):
        assert key in m, (key, sorted(m))
    assert m["val/nmse"] < 0.9, m
    torch.testing.assert_close(model.sae.W_dec.norm(dim=1), torch.ones(128))
    out = Path(trainer.log_dir) / "sae"
    loaded = load_sae(out)
    assert loaded.activation == activation
    x = next(iter(dm.val_dataloader()))[:64]
    model.sae.eval()
    torch.testing.assert_close(loaded.reconstruct(x), model.sae.reconstruct(x), rtol=1e-4, atol=1e-4)
    # SAELens's sparsity.safetensors: log10 of each latent's firing density over training
    from safetensors.torch import load_file

    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    expected = torch.log10(model.fire_counts.double() / int(model.tokens_seen) + 1e-10).float()
    torch.testing.assert_close(sparsity, expected)
    assert int(model.tokens_seen) == 40 * 256
    meta = loaded.export_cfg["metadata"]
    assert meta["training_tokens"] == 40 * 256 and meta["sae_lit_version"]


def test_jumprelu_is_loaded_not_trained():
    with pytest.raises(ValueError, match="not train it"):
        sae_module(d_in=8, num_latents=16, k=2, activation="jumprelu")


def test_b_dec_init_switch():
    for mode, check in [("mean", lambda b, x: torch.testing.assert_close(b, x.mean(0))),
                        ("zero", lambda b, x: torch.testing.assert_close(b, torch.zeros_like(b)))]:
        sae, x = _sae("topk", b_dec_init=mode)
        x_norm, _ = sae.normalize_input(x)
        check(sae.b_dec.detach(), x_norm)
    with pytest.raises(ValueError, match="b_dec_init"):
        TopKSAE(8, 16, 2, b_dec_init="median")


@pytest.mark.parametrize("alpha", [0.0, 1 / 32])
def test_untied_init_and_auxk_off_switches(alpha, tmp_path):
    sae = TopKSAE(16, 64, 4, tied_init=False, seed=0)
    assert not torch.equal(sae.W_enc, sae.W_dec)
    # dead_tokens=1: almost every latent counts as dead; only alpha decides whether AuxK runs.
    model = sae_module(d_in=32, num_latents=1024, k=4, auxk_alpha=alpha, dead_tokens=1, tied_init=False, warmup_steps=1)
    dm = SyntheticActivationDataModule(d_in=32, num_features=128, batch_size=64)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert m["train/dead_frac"] > 0.5
    assert (float(m["train/auxk"]) > 0) == (alpha > 0)
    assert float(m["train/loss"]) == pytest.approx(float(m["train/nmse"]) + alpha * float(m["train/auxk"]), rel=1e-5)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="softmax"):
        TopKSAE(8, 16, 2, activation="softmax")


def test_export_refuses_batchtopk_without_threshold(tmp_path):
    sae = TopKSAE(8, 16, 2, activation="batchtopk")
    with pytest.raises(ValueError, match="threshold"):
        export_sae(sae, tmp_path / "x")
