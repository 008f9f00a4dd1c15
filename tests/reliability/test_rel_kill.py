"""Whole processes: kill -9 while caching and while training (resume to identical bytes), a full
disk (a real tmpfs where the machine allows one), two builders at once. Slow: each trial
starts Python processes. benchmarks/reliability_trials.py runs the same trials many times."""
from __future__ import annotations

import shutil

import pytest

from conftest import tiny_cache_kwargs
from faults import cache_files, tmpfs_available
from trials import (cache_kill_trial, cache_reference, concurrent_builders_trial, disk_full_cache_trial,
                    disk_full_train_trial, train_kill_trial, train_reference)

pytestmark = pytest.mark.slow
needs_tmpfs = pytest.mark.skipif(not tmpfs_available(), reason="cannot mount a tmpfs here (user + mount namespace)")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_model_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("kill")
    kwargs = dict(tiny_cache_kwargs(root / "x", tiny_model_dir, tiny_corpus), train_tokens=16 * 120)
    files, seconds = cache_reference(root, kwargs)
    return {"root": root, "kwargs": dict(kwargs, cache_dir=str(root / "reference")), "files": files, "seconds": seconds}


@pytest.fixture(scope="module")
def trained(ref):
    workdir = ref["root"] / "train"
    workdir.mkdir()
    files, seconds, config = train_reference(workdir, ref["kwargs"], max_steps=12)
    return {"workdir": workdir, "files": files, "seconds": seconds, "config": config}


@pytest.mark.parametrize("when", ["temp:1", "shards:6", "finalize"])
def test_kill_while_caching_resumes_to_identical_bytes(ref, tmp_path, when):
    r = cache_kill_trial(tmp_path, ref["kwargs"], ref["files"], when, ref["seconds"])
    assert r["reached"] and r["interrupted"], r
    assert r["outcome"] == "identical", r


@pytest.mark.parametrize("when", ["step:2", "step:9"])
def test_kill_while_training_resumes_to_identical_weights(trained, tmp_path, when):
    r = train_kill_trial(tmp_path, trained["config"], trained["files"], when, trained["seconds"])
    assert r["interrupted"] and r["checkpoints_loadable"], r
    assert r["outcome"] == "identical", r


@needs_tmpfs
def test_disk_full_while_caching(ref, tmp_path):
    r = disk_full_cache_trial(tmp_path, ref["kwargs"], ref["files"], size_kb=200)
    assert r["first_rc"] == 1 and "No space left" in r["first_error"] and not r["temps_left"], r
    assert r["outcome"] == "identical", r


@needs_tmpfs
def test_disk_full_while_training(ref, trained, tmp_path):
    r = disk_full_train_trial(tmp_path, ref["kwargs"], trained["files"], size_kb=300, max_steps=12)
    assert r["first_rc"] == 1 and "No space left" in r["first_error"], r
    assert r["all_checkpoints_load"] and not r["temps_left"], r
    assert r["outcome"] == "identical", r


def test_two_builders_at_once(ref, tmp_path):
    r = concurrent_builders_trial(tmp_path, ref["kwargs"], ref["files"])
    assert r["outcome"] == "identical", r
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert cache_files(ref["kwargs"]["cache_dir"]) == ref["files"]
