"""The command line and every shipped config."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_lit.training.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
# Configs of other commands (tested with them): configs/dashboard.yaml (python -m sae_lit.dashboard).
TOOL_CONFIGS = {ROOT / "configs" / "dashboard.yaml"}
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "sweeps" not in p.parts and p not in TOOL_CONFIGS)
# Presets that stack on top of an experiment config rather than standing alone.
PRESETS = {p for p in CONFIGS if p.parent.name in ("trainer", "callbacks")}
SYNTHETIC = ["--data=sae_lit.data.synthetic.SyntheticActivationDataModule", "--data.d_in=32",
             "--data.batch_size=256", "--data.num_features=128"]


def test_main_py_fit_tiny_config_end_to_end(tmp_path):
    r = subprocess.run(
        [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=20", "--trainer.val_check_interval=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Final validation: " in r.stdout and "val/nmse=" in r.stdout
    assert list(tmp_path.rglob("sae/cfg.json")) and list(tmp_path.rglob("config.yaml"))
    assert list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in PRESETS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_builds_and_fast_dev_runs(config, tmp_path):
    """Each experiment config parses; its model and trainer settings run one step on a
    tiny synthetic data module (the real data of gpt2-small etc. cannot be fetched here)."""
    args = ["fit", "--config", str(config), *SYNTHETIC, "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            "--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path}", "--model.sae.num_latents=256",
            "--model.sae.k=8"]
    cli_main(args)


@pytest.mark.parametrize("preset", sorted(PRESETS), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_preset_builds_on_top_of_tiny(preset, tmp_path):
    # Hardware settings are overridden back to one CPU: this checks the preset's keys.
    cli = cli_main(["--config", "configs/tiny.yaml", "--config", str(preset), "--trainer.accelerator=cpu",
                    "--trainer.precision=32-true", "--trainer.devices=1", "--trainer.strategy=auto",
                    f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model.sae_config.d_in == 64  # the SAE itself may be deferred (model.defer_init)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_fit(tmp_path):
    cli_main(["fit", "--config", "configs/tiny.yaml", "--config", "configs/trainer/gpu.yaml",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=20"])


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in PRESETS], ids=lambda p: str(p.relative_to(ROOT)))
def test_data_sections_match_their_class(config):
    """Every data section names a real class and only arguments it takes (checked without
    building it: gpt2-small would need the hub)."""
    import importlib
    import inspect

    import yaml

    data = yaml.safe_load(config.read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    inspect.signature(cls).bind(**data.get("init_args", {}))


def test_quickstart_builds_the_real_data_module(tmp_path):
    cli = cli_main(["--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert type(cli.datamodule).__name__ == "ActivationDataModule"
    assert cli.datamodule.d_in == cli.model.sae.d_in == 576  # SmolLM2-135M, from the GGUF config


def test_sae_lit_command_fits_and_exports(tmp_path):
    """`sae-lit` (pyproject's console script, sae_lit.__main__) runs the stages: `python -m sae_lit
    fit` as main.py does, then `export` of the checkpoint in both formats."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sae-lit": "sae_lit.__main__:main"}
    r = subprocess.run(
        [sys.executable, "-m", "sae_lit", "fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.max_steps=10", "--trainer.val_check_interval=10"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from sae_lit.__main__ import main
    from sae_lit.model.formats import load_sae

    ckpt = next(tmp_path.rglob("*.ckpt"))
    for fmt, weights in [("saelens", "sae_weights.safetensors"), ("sparsify", "sae.safetensors")]:
        out = main(["export", str(ckpt), str(tmp_path / fmt), "--format", fmt])
        assert (out / weights).exists() and load_sae(out).export_cfg["format"] == fmt
    with pytest.raises(SystemExit, match="unknown command"):
        main(["train"])
