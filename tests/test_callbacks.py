"""The eval callbacks inside a real Trainer: cadence, off switch, TensorBoard tags and images,
the merged report, activation-only data modules."""
import json
from pathlib import Path

import lightning as L
import pytest

from sae_lit.training.callbacks import DownstreamEval, EvalSuite, ShrinkageEval
from sae_lit.data.datamodule import ActivationDataModule
from sae_lit.evals.suite import EvalConfig
from sae_lit.training.module import SAEModule
from sae_lit.data.synthetic import SyntheticActivationDataModule
from conftest import make_datamodule, sae_module


def _trainer(tmp_path, callbacks, max_steps=4, val_every=2):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=val_every, check_val_every_n_epoch=None,
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        num_sanity_val_steps=0, callbacks=callbacks,
    )


def _module(d_in):
    return sae_module(d_in=d_in, num_latents=64, k=4, warmup_steps=1, lr=1e-3, init_sample_size=256, histogram_every_n_steps=0)


def test_suite_every_n_validations_tensorboard_and_report(tmp_path, cache_kwargs):
    dm = make_datamodule(cache_kwargs, batch_size=64, progress=False)
    suite = EvalSuite(every_n_validations=2, config=EvalConfig(
        evals=["downstream", "shrinkage", "progressive"], downstream_contexts=2, activation_tokens=64, calibration_tokens=64))
    calls = []
    suite_run = suite._run
    suite._run = lambda tr, pl, stage: (calls.append((stage, tr.global_step)), suite_run(tr, pl, stage))
    trainer = _trainer(tmp_path, [suite], max_steps=4, val_every=1)
    module = _module(dm.d_in)
    trainer.fit(module, dm)
    assert calls == [("validation", 2), ("validation", 4)]  # 4 validations, every 2nd
    trainer.test(module, dm)
    assert calls[-1][0] == "test"

    log_dir = Path(trainer.log_dir)
    report = json.loads((log_dir / "eval" / "report.json").read_text())
    assert report["stage"] == "test" and report["config"]["downstream_contexts"] == 2
    assert {"eval/delta_ce", "eval/kl", "eval/ce_recovered", "eval/shrinkage"} <= set(report["metrics"])
    assert trainer.callback_metrics["eval/delta_ce"] == pytest.approx(report["metrics"]["eval/delta_ce"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(log_dir)).Reload()
    assert {"eval/delta_ce", "eval/kl", "eval/ce_recovered", "eval/shrinkage"} <= set(ev.Tags()["scalars"])
    assert [e.step for e in ev.Scalars("eval/delta_ce")][:2] == [2, 4]
    assert "eval/progressive_recovery" in ev.Tags()["images"]


def test_off_switch_and_activation_only_data(tmp_path):
    dm = SyntheticActivationDataModule(d_in=16, num_features=64, batch_size=256, val_batches=1)
    off = DownstreamEval(enabled=False)
    on = ShrinkageEval(every_n_validations=1)
    trainer = _trainer(tmp_path, [off, on], max_steps=2, val_every=2)
    trainer.fit(_module(16), dm)
    assert off.last_report is None
    assert on.last_report["metrics"]["eval/shrinkage"] > 0
    report = json.loads((Path(trainer.log_dir) / "eval" / "report.json").read_text())
    assert list(report["details"]) == ["shrinkage"]


def test_lm_evals_skipped_with_a_note_without_a_subject_model(tmp_path):
    dm = SyntheticActivationDataModule(d_in=16, num_features=64, batch_size=256, val_batches=1)
    suite = EvalSuite(config=EvalConfig(activation_tokens=128, calibration_tokens=128))
    _trainer(tmp_path, [suite], max_steps=2, val_every=2).fit(_module(16), dm)
    assert set(suite.last_report["skipped"]) == {"downstream", "probes", "ablation", "n2g"}
    assert "eval/shrinkage" in suite.last_report["metrics"]


def test_bad_cadence_is_refused():
    with pytest.raises(ValueError, match="every_n_validations"):
        EvalSuite(every_n_validations=-1)
