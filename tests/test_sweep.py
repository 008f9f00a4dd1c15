"""Sweeps: expansion and naming, a tiny end-to-end sweep on synthetic data, resume, tables."""
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml

from sae_lit.analysis import sweep
from sae_lit.model.sae import SAEConfig
from sae_lit.training.module import SAEModule

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, groups):
    spec = {
        "root": str(tmp_path / "sweep"),
        "base_config": str(ROOT / "configs" / "tiny.yaml"),
        "common": {"trainer.max_steps": 12, "trainer.val_check_interval": 6, "trainer.enable_progress_bar": False,
                   "model.sae.num_latents": 128, "data.init_args.val_batches": 1, "data.init_args.batch_size": 256},
        "defaults": {"model.sae.activation": "topk", "model.sae.num_latents": 128, "model.sae.k": 8, "lr_mult": 1.0},
        "lr_at_16k": 1e-3,
        "eval": {"activation_tokens": 256, "calibration_tokens": 256, "shrinkage_tokens": 64},
        "groups": groups,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expand_dedupes_runs_shared_by_groups(tmp_path):
    spec = sweep.read_sweep(_spec(tmp_path, {
        "a": {"grid": {"model.sae.k": [4, 8]}},
        "b": {"evals": ["shrinkage"], "runs": [{"model.sae.k": 8}, {"model.sae.k": 8, "model.sae.activation": "relu"}]},
    }))
    runs = {r.name: r for r in sweep.expand(spec)}
    assert sorted(runs) == ["relu-n128-k8", "topk-n128-k4", "topk-n128-k8"]
    assert runs["topk-n128-k8"].groups == ["a", "b"] and runs["topk-n128-k8"].evals == ["shrinkage"]
    assert runs["topk-n128-k4"].evals == []
    over = sweep.cli_overrides(runs["topk-n128-k4"], spec)
    assert over["model.lr"] == pytest.approx(1e-3 * (2**14 / 128) ** 0.5) and "lr_mult" not in over


def test_seed_replicates_reseed_the_sae_and_the_stream(tmp_path):
    spec = sweep.read_sweep(_spec(tmp_path, {"a": {"grid": {"seed": [0, 2]}}}))
    spec["defaults"]["seed"] = 0
    runs = {r.name: r for r in sweep.expand(spec)}
    assert sorted(runs) == ["topk-n128-k8", "topk-n128-k8-seed2"]  # seed 0 keeps the name it had
    over = sweep.cli_overrides(runs["topk-n128-k8-seed2"], spec)
    assert over["seed_everything"] == over["model.sae.seed"] == over["data.init_args.seed"] == 2 and "seed" not in over


def test_an_eval_measured_at_an_older_version_is_measured_again():
    from sae_lit.evals.suite import EVAL_VERSIONS

    row = {"evals": "downstream;probes;shrinkage@2"}  # bare names: version 1
    assert EVAL_VERSIONS["probes"] > 1 and EVAL_VERSIONS["downstream"] == 1
    assert sweep.evals_done(row) == {"downstream", "shrinkage"}
    assert sweep.evals_done({"evals": sweep.evals_field(["probes", "n2g"])}) == {"probes", "n2g"}


def test_tiny_sweep_runs_resumes_and_writes_tables(tmp_path):
    path = _spec(tmp_path, {
        "nk": {"grid": {"model.sae.k": [4, 8]}},
        "relu": {"evals": ["shrinkage"], "runs": [{"model.sae.activation": "relu", "model.l1_coeff": 0.01}]},
    })
    rows = sweep.main(["--config", str(path)])
    assert len(rows) == 3
    root = tmp_path / "sweep"
    table = sweep.read_table(root / "results.csv")
    by = {r["run"]: r for r in table}
    assert by["topk-n128-k4"]["val/l0"] <= 4 and by["topk-n128-k4"]["tokens"] == 12 * 256
    assert by["topk-n128-k4"]["flops"] == pytest.approx(6 * 64 * 128 * 12 * 256)
    assert "eval/shrinkage" in by["relu-n128-k8-l10.01"] and by["relu-n128-k8-l10.01"]["eval/shrinkage"] > 0
    curves = sweep.read_table(root / "curves.csv")
    assert {c["run"] for c in curves} == set(by) and {c["step"] for c in curves} == {6, 12}
    # Resume: finished runs are skipped (their result files are not rewritten).
    done = root / "runs" / "topk-n128-k4" / "result.json"
    stamp = done.stat().st_mtime_ns
    (root / "runs" / "topk-n128-k8" / "result.json").unlink()
    rows = sweep.main(["--config", str(path)])
    assert len(rows) == 3 and done.stat().st_mtime_ns == stamp
    assert json.loads((root / "runs" / "topk-n128-k8" / "result.json").read_text())["row"]["k"] == 8
    # A group that now also wants a finished run evaluated: only the eval runs, no retraining.
    spec = yaml.safe_load(path.read_text())
    spec["groups"]["nk"]["evals"] = ["shrinkage"]
    path.write_text(yaml.safe_dump(spec))
    rows = sweep.main(["--config", str(path)])
    assert done.stat().st_mtime_ns != stamp
    by = {r["run"]: r for r in sweep.read_table(root / "results.csv")}
    assert by["topk-n128-k4"]["eval/shrinkage"] > 0 and by["topk-n128-k4"]["evals"] == "shrinkage@2"
    assert len(list((root / "runs" / "topk-n128-k4" / "lightning_logs").iterdir())) == 1  # not retrained


def test_unreadable_result_is_named(tmp_path):
    path = _spec(tmp_path, {"a": {"runs": [{}]}})
    bad = tmp_path / "sweep" / "runs" / "x" / "result.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="result.json"):
        sweep.main(["--config", str(path), "--collect"])


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml"])
def test_shipped_sweeps_expand_to_known_settings(name):
    spec = sweep.read_sweep(ROOT / "configs" / "sweeps" / name)
    assert (ROOT / spec["base_config"]).is_file()
    params = set(inspect.signature(SAEModule.__init__).parameters)
    params |= {f"sae.{f.name}" for f in dataclasses.fields(SAEConfig)}
    runs = sweep.expand(spec)
    assert len(runs) >= 10
    for r in runs:
        for key in sweep.cli_overrides(r, spec):
            if key.startswith("model."):
                assert key.split(".", 1)[1] in params, (r.name, key)


def test_evals_read_the_data_the_runs_trained_on(tmp_path, monkeypatch):
    """A sweep whose `common` overrides the cache evaluates on that cache, not the base config's."""
    from sae_lit.evals import evaluate

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"class_path": "x", "init_args": {"cache": {"cache_dir": "base/cache",
                                                                                          "train_tokens": 100}}}}))
    seen = {}

    class Stop(Exception):
        pass

    def capture(config, path):
        seen.update(config)
        raise Stop

    monkeypatch.setattr(evaluate, "datamodule_from_config", capture)
    spec = {"base_config": str(base), "common": {"trainer.max_steps": 3, "data.init_args.cache.cache_dir": "/other",
                                                 "data.init_args.batch_size": 64}}
    runner = sweep.EvalRunner(spec, [sweep.Run("r", {}, ["g"], ["shrinkage"])])
    with pytest.raises(Stop):
        runner(sweep.Run("r", {}, ["g"], ["shrinkage"]), tmp_path, tmp_path)
    assert seen["data"]["init_args"]["cache"] == {"cache_dir": "/other", "train_tokens": 100}
    assert seen["data"]["init_args"]["batch_size"] == 64 and "trainer" not in seen
