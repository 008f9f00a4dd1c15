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
