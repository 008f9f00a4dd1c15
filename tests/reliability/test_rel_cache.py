"""Faults in the activation cache: a lost manifest, old formats, flipped bytes, truncation, hostile
member names, leftovers of killed builds, two builders at once, a full disk while caching."""
from __future__ import annotations

import errno
import itertools
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import make_datamodule, tiny_cache_kwargs
from faults import (HOSTILE_NAMES, cache_files, flip_byte, member_span, npy_payload_span, temp_files, truncate,
                    with_hostile_member)
from sae_lit.data import cache as cache_mod
from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache, main
from sae_lit.data.integrity import verify_cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A finished tiny cache (5 train + 2 val shards); tests work on copies."""
    kwargs = tiny_cache_kwargs(tmp_path_factory.mktemp("ref") / "cache", tiny_model_dir, tiny_corpus)
    build_cache(CacheConfig(**kwargs), progress=False)
    return kwargs


@pytest.fixture
def copy(reference, tmp_path):
    """A copy of the reference cache and its kwargs."""
    shutil.copytree(reference["cache_dir"], tmp_path / "cache")
    return dict(reference, cache_dir=str(tmp_path / "cache"))


def _dm(kwargs, **kw):
    dm = make_datamodule(kwargs, **{"batch_size": 32, "shuffle_buffer": 64, "progress": False, **kw})
    dm.setup()
    return dm


def _read_everything(dm):
    list(itertools.islice(dm.train_dataloader(), 60))
    list(dm.val_dataloader())


# --- provenance ----------------------------------------------------------------------------------


def test_lost_manifest_and_another_hookpoint_is_refused(copy):
    """Issue case 1: it used to print "already complete" and label layer-1 shards as layer 2."""
    before = cache_files(copy["cache_dir"])
    (Path(copy["cache_dir"]) / "manifest.json").unlink()
    with pytest.raises(sh.ManifestMismatchError) as e:
        build_cache(CacheConfig(**dict(copy, hookpoint="resid_post.2")), progress=False)
    msg = str(e.value)
    assert "train-000000.tar" in msg and "another cache" in msg and "Delete" in msg and copy["cache_dir"] in msg
    assert sh.read_manifest(copy["cache_dir"])["hookpoint"] == "resid_post.2"  # only the start of a build
    assert {k: v for k, v in cache_files(copy["cache_dir"]).items() if k.endswith(".tar")} == {
        k: v for k, v in before.items() if k.endswith(".tar")}  # no shard touched


def test_lost_manifest_same_config_rebuilds_it_identically(copy):
    before = cache_files(copy["cache_dir"])
    (Path(copy["cache_dir"]) / "manifest.json").unlink()
    result = build_cache(CacheConfig(**copy), progress=False)
    assert result.tokens_computed == 0  # every shard checked and kept
    assert cache_files(copy["cache_dir"]) == before


def test_old_format_cache_is_refused_with_what_to_do(copy):
    path = Path(copy["cache_dir"]) / "manifest.json"
    m = json.loads(path.read_text())
    old = {k: v for k, v in m.items() if k != "crc32"}  # format 1 had no checksum either
    path.write_text(json.dumps(dict(old, format_version=1)))
    with pytest.raises(sh.ManifestMismatchError, match=r"format version 1.*Delete"):
        make_datamodule(copy, progress=False)


def test_old_format_shards_without_manifest_are_refused(copy):
    """A format-1 shard (no check.json) with the manifest gone: no provenance, so refused."""
    shard = Path(copy["cache_dir"]) / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith("check.json")]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, __import__("io").BytesIO(data))
    (Path(copy["cache_dir"]) / "manifest.json").unlink()
    with pytest.raises(sh.ManifestMismatchError, match="without provenance records"):
        build_cache(CacheConfig(**copy), progress=False)


def test_shard_from_another_cache_is_caught_on_read(copy, tmp_path, reference):
    other = dict(reference, cache_dir=str(tmp_path / "other"), hookpoint="resid_post.2")
    build_cache(CacheConfig(**other), progress=False)
    shutil.copy(Path(other["cache_dir"]) / "train-000001.tar", Path(copy["cache_dir"]) / "train-000001.tar")
    with pytest.raises(sh.CorruptShardError, match=r"train-000001.tar.*another configuration"):
        _read_everything(_dm(copy))
    assert any(f == "train-000001.tar" for f, _ in verify_cache(copy["cache_dir"])[1])


# --- flipped bytes, truncation ---------------------------------------------------------------------


def test_edited_manifest_is_refused_and_rebuilt_from_the_shards(copy, reference):
    path = Path(copy["cache_dir"]) / "manifest.json"
    text = path.read_text()
    i = text.index('"norm_scale": ') + len('"norm_scale": ') + 3
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])  # one digit of norm_scale
    with pytest.raises(sh.CacheError, match=r"manifest.json does not match its checksum.*rebuilt from the shards"):
        make_datamodule(copy, progress=False)
    path.unlink()
    assert build_cache(CacheConfig(**copy), progress=False).tokens_computed == 0
    assert cache_files(copy["cache_dir"]) == cache_files(reference["cache_dir"])



@pytest.mark.parametrize("member", ["acts.npy", "tokens.npy", "meta.json", "check.json"])
def test_flipped_byte_in_a_member_is_detected(copy, member):
    """Issue case 3: a flip inside an .npy payload (header intact) trained without a word."""
    shard = Path(copy["cache_dir"]) / "train-000003.tar"
    start, end = npy_payload_span(shard, member, block=2) if member.endswith(".npy") else member_span(shard, member, 2)
    flip_byte(shard, (start + end) // 2)
    _, problems = verify_cache(copy["cache_dir"])
    assert [f for f, _ in problems] == ["train-000003.tar"]
    if member != "meta.json":  # training reads no meta.json
        with pytest.raises(sh.CorruptShardError, match="train-000003.tar"):
            _read_everything(_dm(copy))


def test_flipped_byte_is_skippable_and_counted(copy):
    shard = Path(copy["cache_dir"]) / "train-000001.tar"
    start, end = npy_payload_span(shard, "acts.npy")
    flip_byte(shard, start + 5)
    dm = _dm(copy, skip_corrupt_shards=True)
    assert len(list(itertools.islice(dm.train_dataloader(), 100))) == 100
    assert dm.skipped_shards == 1


def test_verify_command_line(copy, capsys):
    assert main(["--cache_dir", copy["cache_dir"], "--verify", "--quiet"]) == []
    assert "OK, 7 shards" in capsys.readouterr().out
    shard = Path(copy["cache_dir"]) / "val-000001.tar"
    flip_byte(shard, npy_payload_span(shard)[0] + 1)
    with pytest.raises(SystemExit) as e:
        main(["--cache_dir", copy["cache_dir"], "--verify", "--quiet"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "DAMAGED" in out and "val-000001.tar" in out and "checksum" in out
    # The fix the message gives: delete the shard and build again -> the original bytes.
    shard.unlink()
    assert build_cache(CacheConfig(**copy), progress=False).tokens_computed == 4 * 16
    assert main(["--cache_dir", copy["cache_dir"], "--verify", "--quiet"]) == []


def test_damaged_shard_found_by_a_resumed_build_is_rebuilt(copy, reference, caplog):
    """A resumed build reads the shards it keeps; a damaged one is rebuilt, with a warning."""
    (Path(copy["cache_dir"]) / "manifest.json").unlink()
    shard = Path(copy["cache_dir"]) / "train-000002.tar"
    flip_byte(shard, npy_payload_span(shard)[0] + 3)
    result = build_cache(CacheConfig(**copy), progress=False)
    assert result.tokens_computed == 8 * 16 and "rebuilding" in caplog.text
    assert cache_files(copy["cache_dir"]) == cache_files(reference["cache_dir"])


@pytest.mark.parametrize("where", ["mid_member", "member_boundary", "last_val_block"])
def test_truncated_shards_are_named(copy, where):
    """Issue case 4: a truncated last val shard went unnoticed (validation stopped early)."""
    name = "train-000004.tar" if where != "last_val_block" else "val-000001.tar"
    shard = Path(copy["cache_dir"]) / name
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = {"mid_member": members[5].offset_data + 7, "member_boundary": members[8].offset,
           "last_val_block": members[-4].offset}[where]
    truncate(shard, cut)
    with pytest.raises(sh.CorruptShardError, match=name):
        _read_everything(_dm(copy))
    assert [f for f, _ in verify_cache(copy["cache_dir"])[1]] == [name]


# --- hostile member names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("first", [True, False], ids=["before", "after"])
def test_hostile_member_names(copy, tmp_path, monkeypatch, name, first):
    """Issue case 6: `../../evil.acts.npy` crashed with a bare IndexError, even when skipping."""
    monkeypatch.chdir(tmp_path)
    shard = Path(copy["cache_dir"]) / "train-000002.tar"
    with_hostile_member(shard, name, first)
    with pytest.raises(sh.CorruptShardError, match="train-000002.tar"):
        list(sh.iter_shard(str(shard), 8))
    dm = _dm(copy, skip_corrupt_shards=True)
    assert len(list(itertools.islice(dm.train_dataloader(), 100))) == 100 and dm.skipped_shards == 1
    assert not list(tmp_path.rglob("evil*")) and not Path("/etc/evil.acts.npy").exists()


# --- killed builds, two builders, a full disk ---------------------------------------------------------


def test_stale_temp_files_are_removed_on_start(copy, reference):
    cache_dir = Path(copy["cache_dir"])
    (cache_dir / "train-000003.tar").unlink()
    (cache_dir / "manifest.json").unlink()
    for name in (".train-000003.tar.tmp12345", ".manifest.json.tmp777", ".sample.npy.tmp4"):
        (cache_dir / name).write_bytes(b"half written")
    build_cache(CacheConfig(**copy), progress=False)
    assert temp_files(cache_dir) == []
    assert cache_files(cache_dir) == cache_files(reference["cache_dir"])


def test_two_builders_compute_every_shard_once(tmp_path, reference):
    kwargs = dict(reference, cache_dir=str(tmp_path / "cache"))
    results, errors = [], []

    def build():
        try:
            results.append(build_cache(CacheConfig(**kwargs), progress=False).tokens_computed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [0, (40 + 12) * 16]
    assert cache_files(kwargs["cache_dir"]) == cache_files(reference["cache_dir"])


def test_disk_full_while_caching_reports_once_and_resumes(tmp_path, reference, monkeypatch):
    """Issue case 6: ENOSPC raised again inside the abort path and left a partial .tmp."""
    kwargs = dict(reference, cache_dir=str(tmp_path / "cache"))
    real_add, real_close, calls = sh.ShardWriter.add, tarfile.TarFile.close, []

    def add(self, *a, **kw):
        calls.append(1)
        if len(calls) >= 19:  # inside the third shard
            self._tar.fileobj.write(b"x" * 100)  # some bytes landed before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, *a, **kw)

    def close_fails(self):  # the tar's final flush fails too, as on a full disk
        if len(calls) >= 19:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(sh.ShardWriter, "add", add)
    monkeypatch.setattr(tarfile.TarFile, "close", close_fails)
    with pytest.raises(sh.CacheError, match="No space left") as e:
        build_cache(CacheConfig(**kwargs), progress=False)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.__context__ is None  # one error, not two
    assert temp_files(kwargs["cache_dir"]) == []
    monkeypatch.undo()
    assert build_cache(CacheConfig(**kwargs), progress=False).tokens_computed == (40 - 16 + 12) * 16
    assert cache_files(kwargs["cache_dir"]) == cache_files(reference["cache_dir"])


def test_kill_inside_a_shard_write_leaves_only_a_temp_that_is_cleaned(tmp_path, reference):
    """In-process stand-in for kill -9 (the subprocess version is slow, test_rel_kill.py): the
    process dies with a shard half written and never runs its cleanup."""
    kwargs = dict(reference, cache_dir=str(tmp_path / "cache"))

    class Killed(BaseException):
        pass

    real_add, calls = sh.ShardWriter.add, []

    def add(self, *a, **kw):
        calls.append(1)
        real_add(self, *a, **kw)
        if len(calls) == 12:
            self._tar.fileobj.flush()
            self.abort = lambda: None  # a killed process cleans nothing up
            raise Killed

    sh.ShardWriter.add = add
    try:
        with pytest.raises(Killed):
            build_cache(CacheConfig(**kwargs), progress=False)
    finally:
        sh.ShardWriter.add = real_add
    assert temp_files(kwargs["cache_dir"]) == [".train-000001.tar.tmp%d" % __import__("os").getpid()]
    build_cache(CacheConfig(**kwargs), progress=False)
    assert cache_files(kwargs["cache_dir"]) == cache_files(reference["cache_dir"])


def test_nonfinite_counts_survive_a_lost_manifest(tmp_path, reference, monkeypatch):
    """The manifest rebuilt from shards on disk records the same NaN/Inf rows."""
    kwargs = dict(reference, cache_dir=str(tmp_path / "cache"))
    real = cache_mod.HookedForward.__call__

    def poisoned(self, ids):
        out = real(self, ids).clone()
        out[ids % 29 == 0] = float("nan")
        return out

    monkeypatch.setattr(cache_mod.HookedForward, "__call__", poisoned)
    first = build_cache(CacheConfig(**kwargs), progress=False).manifest
    monkeypatch.undo()
    assert first["nonfinite_tokens"]["train"] > 0
    (Path(kwargs["cache_dir"]) / "manifest.json").unlink()
    assert build_cache(CacheConfig(**kwargs), progress=False).manifest == first
    assert np.isfinite(np.load(Path(kwargs["cache_dir"]) / "sample.npy").astype(np.float32)).all()
