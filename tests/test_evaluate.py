"""`python -m sae_lit.evals` on an exported SAE over the tiny llama's activation cache."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from sae_lit.data.datamodule import ActivationDataModule
from sae_lit.evals.evaluate import main
from sae_lit.model.formats import export_sae
from sae_lit.model.sae import TopKSAE
from conftest import make_datamodule

# Budgets small enough for a 16-token, 12-block validation split.
TINY_EVALS = dict(
    downstream_contexts=4, activation_tokens=128, calibration_tokens=128, lm_batch_size=4,
    probe_code_snippets=24, probe_pydoc_snippets=8, probe_kjv_snippets_per_genre=4, probe_snippet_tokens=32,
    probe_max_per_class=24, ablation_contexts=2, ablation_positions_per_context=2, ablation_latents_per_position=2,
    ablation_context_length=16, ablation_window=8, n2g_latents=4, n2g_blocks=8, n2g_top_examples=4,
    n2g_random_examples=2, n2g_max_suffix=3,
)


@pytest.fixture
def exported(tmp_path, cache_kwargs):
    dm = make_datamodule(cache_kwargs, batch_size=64, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    sae = TopKSAE(dm.d_in, 64, k=4, seed=0)
    sae.init_from_data(dm.init_sample(256), scale=dm.norm_scale)
    out = export_sae(sae, tmp_path / "run" / "sae", metadata=dm.export_metadata())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"class_path": "sae_lit.data.datamodule.ActivationDataModule", "init_args": {"cache": cache_kwargs, "progress": False}},
        "trainer": {"callbacks": [{"class_path": "sae_lit.training.callbacks.EvalSuite", "init_args": {"config": TINY_EVALS}}]},
    }))
    return out, config


def test_evaluate_writes_full_report(exported, capsys):
    sae_dir, config = exported
    report = main(["--sae", str(sae_dir), "--config", str(config), "--evals.strict", "true", "--device", "cpu"])
    out = sae_dir.parent / "eval"
    on_disk = json.loads((out / "report.json").read_text())
    for name in ["eval/delta_ce", "eval/kl", "eval/ce_recovered", "eval/probe_loss", "eval/probe_loss_residual",
                 "eval/n2g_precision", "eval/n2g_recall", "eval/ablation_sparsity", "eval/ablation_sparsity_residual",
                 "eval/shrinkage"]:
        assert name in on_disk["metrics"], name
    assert on_disk["errors"] == {}
    # the config used: budgets from the config file's EvalSuite callback, and the data section
    assert on_disk["config"]["n2g_latents"] == 4
    assert on_disk["data_config"]["init_args"]["cache"]["context_length"] == 16
    assert (out / "eval_progressive_recovery.png").exists() and (out / "eval_probe_tasks.png").exists()
    assert (out / "n2g_explanations.json").exists()
    assert list(out.glob("events.out.tfevents.*"))
    assert "ablation sparsity" in capsys.readouterr().out
    assert report["metrics"] == pytest.approx({k: v for k, v in on_disk["metrics"].items()}, nan_ok=True)


def test_evaluate_refuses_a_mismatched_sae(exported, tmp_path):
    _, config = exported
    other = export_sae(TopKSAE(7, 16, k=2), tmp_path / "other")
    with pytest.raises(ValueError, match="d_in=7"):
        main(["--sae", str(other), "--config", str(config), "--device", "cpu"])


def test_evaluate_names_a_missing_data_section(tmp_path, exported):
    sae_dir, _ = exported
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {}\n")
    with pytest.raises(KeyError, match="no `data:` section"):
        main(["--sae", str(sae_dir), "--config", str(bad), "--device", "cpu"])


def _config(tmp_path, cache_kwargs):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"class_path": "sae_lit.data.datamodule.ActivationDataModule", "init_args": {"cache": cache_kwargs, "progress": False}},
        "trainer": {"callbacks": [{"class_path": "sae_lit.training.callbacks.EvalSuite", "init_args": {"config": TINY_EVALS}}]},
    }))
    return config


FULL_SUITE = ["eval/delta_ce", "eval/kl", "eval/probe_loss", "eval/n2g_precision", "eval/ablation_sparsity", "eval/shrinkage"]


def test_evaluate_a_sparsify_folder(tmp_path, cache_kwargs, caplog):
    """A sparsify run folder (layers.N per hookpoint, the run's config.json naming the model)."""
    dm = make_datamodule(cache_kwargs, batch_size=64, progress=False)
    dm.prepare_data()
    sae = TopKSAE(dm.d_in, 64, k=4, seed=0)
    sae.init_from_data(dm.init_sample(256), scale=dm.norm_scale)
    run = tmp_path / "sparsify_run"
    export_sae(sae, run / "layers.1", format="sparsify")
    (run / "config.json").write_text(json.dumps({"model": cache_kwargs["model"]}))
    config = _config(tmp_path, cache_kwargs)
    caplog.set_level("WARNING")
    report = main(["--sae", str(run / "layers.1"), "--config", str(config), "--evals.strict", "true", "--device", "cpu"])
    assert set(FULL_SUITE) <= set(report["metrics"]) and report["errors"] == {}
    assert report["sae"]["format"] == "sparsify"
    assert "going on anyway" not in caplog.text  # the model and hookpoint match
    assert (run / "layers.1" / "eval" / "report.json").exists()
    # another layer's SAE: same width, so it runs, with a warning
    export_sae(sae, run / "layers.2", format="sparsify")
    main(["--sae", str(run / "layers.2"), "--config", str(config), "--evals.evals", "[shrinkage]", "--device", "cpu"])
    assert "model.layers.2" in caplog.text and "going on anyway" in caplog.text


def test_evaluate_an_openai_file(tmp_path, cache_kwargs, caplog):
    """openai/sparse_autoencoder's TopK state dict at its published path layout (gpt2-small, so a
    warning that the tiny model is another one; the hookpoint resid_post_mlp.1 is the cache's)."""
    from test_formats import openai_state

    g = torch.Generator().manual_seed(0)
    state = {**openai_state(k=4)}
    state.update({"pre_bias": torch.randn(32, generator=g) * 0.1, "encoder.weight": torch.randn(64, 32, generator=g) / 6,
                  "latent_bias": torch.zeros(64), "decoder.weight": torch.randn(32, 64, generator=g) / 6,
                  "stats_last_nonzero": torch.zeros(64, dtype=torch.long), "latents_activation_frequency": torch.ones(64),
                  "latents_mean_square": torch.zeros(64)})
    path = tmp_path / "gpt2-small" / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    caplog.set_level("WARNING")
    report = main(["--sae", str(path), "--config", str(_config(tmp_path, cache_kwargs)), "--evals.strict", "true",
                   "--device", "cpu"])
    assert set(FULL_SUITE) <= set(report["metrics"]) and report["errors"] == {}
    assert report["sae"]["format"] == "openai" and report["sae"]["normalize_activations"] == "layer_norm"
    assert "trained on gpt2" in caplog.text and "exported for hook" not in caplog.text
    assert (path.parent / "eval_1" / "report.json").exists()


def test_evaluate_a_live_object(tmp_path, cache_kwargs):
    dm = make_datamodule(cache_kwargs, batch_size=64, progress=False)
    dm.prepare_data()
    sae = TopKSAE(dm.d_in, 64, k=4, seed=0)
    sae.init_from_data(dm.init_sample(256), scale=dm.norm_scale)
    from sae_lit.evals.evaluate import evaluate
    from sae_lit.evals.suite import EvalConfig

    with pytest.raises(ValueError, match="out_dir"):
        evaluate(sae, str(_config(tmp_path, cache_kwargs)))
    report = evaluate(sae, str(_config(tmp_path, cache_kwargs)), out_dir=str(tmp_path / "out"), device="cpu",
                      eval_cfg=EvalConfig(**{**TINY_EVALS, "evals": ["shrinkage", "progressive"]}))
    assert "eval/shrinkage" in report["metrics"]
