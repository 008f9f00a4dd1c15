"""The notebooks run top to bottom on a tiny cache and a tiny SAE."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from sae_lit.data.datamodule import ActivationDataModule
from sae_lit.model.formats import export_sae
from sae_lit.model.sae import TopKSAE
from conftest import make_datamodule

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_walkthrough_runs(cache_kwargs, tmp_path, monkeypatch):
    dm = make_datamodule(cache_kwargs, batch_size=32, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    sae = TopKSAE(dm.d_in, 64, 4, seed=0)
    sae.init_from_data(dm.init_sample(200), scale=dm.norm_scale)
    export_sae(sae, tmp_path / "sae", metadata=dm.export_metadata())
    monkeypatch.setenv("SAE_LIT_SAE", str(tmp_path / "sae"))
    monkeypatch.setenv("SAE_LIT_CACHE", cache_kwargs["cache_dir"])
    nb = nbformat.read(ROOT / "notebooks" / "quickstart_walkthrough.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "NMSE" in text and "latent " in text
