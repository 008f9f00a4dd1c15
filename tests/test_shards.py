import io
import tarfile

import numpy as np
import pytest
import torch

from sae_lit.data import shards as sh


def _write(path, n_blocks=3, T=4, d=5, split="train", first=0):
    rng = np.random.default_rng(0)
    blocks = []
    w = sh.ShardWriter(path, "cfg")
    for i in range(n_blocks):
        acts = rng.standard_normal((T, d)).astype(np.float16)
        tokens = rng.integers(0, 100, T).astype(np.int32)
        w.add(sh.block_key(split, first + i), acts, tokens, {"doc_id": f"d{i}", "source": "s", "offset": i})
        blocks.append((acts, tokens))
    w.close()
    return blocks


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "train-000000.tar"
    written = _write(path, first=8)
    assert not list(tmp_path.glob(".*"))  # the temporary name is gone after the rename
    read = list(sh.iter_shard(str(path), 3, (4, 5)))
    assert [b.index for b in read] == [8, 9, 10] and read[1].meta == {"doc_id": "d1", "source": "s", "offset": 1}
    for (acts, tokens), b in zip(written, read):
        np.testing.assert_array_equal(b.acts, acts)
        np.testing.assert_array_equal(b.tokens, tokens)
    kept = list(sh.iter_shard(str(path), 3, keep=lambda i: i != 9))
    assert [b.index for b in kept] == [8, 10]
    assert sh.read_block(str(path), 10, "train").tokens.tolist() == written[2][1].tolist()


def test_shards_are_plain_webdataset(tmp_path):
    import webdataset as wds

    path = tmp_path / "train-000000.tar"
    written = _write(path)
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["train-000000000", "train-000000001", "train-000000002"]
    np.testing.assert_array_equal(samples[0]["acts.npy"], written[0][0])
    assert samples[2]["meta.json"]["offset"] == 2


def test_rewriting_a_shard_is_byte_identical(tmp_path):
    _write(tmp_path / "a.tar")
    _write(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_abort_leaves_nothing(tmp_path):
    w = sh.ShardWriter(tmp_path / "train-000000.tar", "cfg")
    w.add("train-000000000", np.zeros((2, 2), np.float16), np.zeros(2, np.int32), {})
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "garbage"])
def test_damaged_shards_are_named(tmp_path, cut):
    path = tmp_path / "train-000007.tar"
    _write(path)
    data = path.read_bytes()
    if cut == "mid_member":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif cut == "member_boundary":
        # Drop the last block's three members (and the end-of-archive marker): still a valid tar.
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        path.write_bytes(data[: members[6].offset])
    else:
        path.write_bytes(b"not a tar file" * 100)
    with pytest.raises(sh.CorruptShardError) as e:
        list(sh.iter_shard(str(path), 3, (4, 5)))
    assert str(path) in str(e.value) and "Delete that file" in str(e.value)
    assert e.value.path == str(path)


def test_wrong_shape_is_corruption(tmp_path):
    path = tmp_path / "val-000000.tar"
    _write(path, d=5)
    with pytest.raises(sh.CorruptShardError, match="expected"):
        list(sh.iter_shard(str(path), 3, (4, 6)))


def test_block_missing_a_member(tmp_path):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        data = io.BytesIO()
        np.save(data, np.zeros(4, np.int32))
        info = tarfile.TarInfo("train-000000000.tokens.npy")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
    with pytest.raises(sh.CorruptShardError, match="lacks"):
        list(sh.iter_shard(str(path)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_round_trip(dtype):
    x = torch.randn(7, 3) * 10
    stored = sh.encode_acts(x, dtype)
    assert stored.dtype == (np.float16 if dtype == "float16" else np.uint16)
    torch.testing.assert_close(sh.decode_acts(stored, dtype), x.to(getattr(torch, dtype)).float(), rtol=0, atol=0)


def test_manifest_mismatch_names_key_values_and_remedy(tmp_path):
    have = {"model": "a", "hookpoint": "resid_post.3", "dtype": "float16", "context_length": 128}
    sh.check_manifest(have, dict(have), tmp_path)
    with pytest.raises(sh.ManifestMismatchError) as e:
        sh.check_manifest(have, dict(have, hookpoint="resid_post.4", context_length=64), tmp_path)
    msg = str(e.value)
    assert "hookpoint: cache has 'resid_post.3', config asks for 'resid_post.4'" in msg
    assert "context_length: cache has 128, config asks for 64" in msg
    assert f"Delete {tmp_path}" in msg and "cache_dir" in msg


def test_unreadable_manifest(tmp_path):
    (tmp_path / sh.MANIFEST).write_text("{not json")
    with pytest.raises(sh.CacheError, match="manifest.json is not valid JSON"):
        sh.read_manifest(tmp_path)
