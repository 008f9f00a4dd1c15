import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache, main
from sae_lit.data.corpus import pack_contexts
from sae_lit.data.subject import HookedForward, load_model, load_tokenizer


def _files(cache_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(cache_dir).iterdir())}


def _read_split(cache_dir, manifest, split):
    shape = (manifest["context_length"], manifest["d_in"])
    blocks = []
    for s in manifest["splits"][split]["shards"]:
        blocks.extend(sh.iter_shard(str(Path(cache_dir) / s["file"]), s["blocks"], shape))
    return blocks


def test_round_trip(cache_kwargs):
    cfg = CacheConfig(**cache_kwargs)
    m = build_cache(cfg, progress=False).manifest
    assert m["complete"] and list(m)[-1] == "complete"
    assert (m["d_in"], m["train_tokens"], m["val_tokens"]) == (32, 640, 192)
    assert m["num_shards"] == {"train": 5, "val": 2} and m["hook_name"] == "model.layers.1"

    # Tokens: exactly the packed contexts; activations: exactly the model's, rounded to float16.
    model, tokenizer = load_model(cfg.model, "cpu"), load_tokenizer(cfg.model)
    corpus = cfg.corpus_obj()
    for split, n in (("train", 40), ("val", 12)):
        blocks = _read_split(cfg.cache_dir, m, split)
        contexts = list(pack_contexts(corpus.documents(split), tokenizer, 16))[:n]
        assert [b.index for b in blocks] == list(range(n))
        tokens = np.stack([b.tokens for b in blocks])
        np.testing.assert_array_equal(tokens, np.stack([c.tokens for c in contexts]))
        with torch.inference_mode():
            expected = HookedForward(model, "resid_post.1")(torch.from_numpy(tokens).long())
        np.testing.assert_array_equal(np.stack([b.acts for b in blocks]), expected.half().numpy())
        assert blocks[0].meta["doc_id"] == contexts[0].docs[0]["id"] and blocks[0].meta["offset"] == 0


def test_norm_scale_and_sample(cache_kwargs):
    m = build_cache(CacheConfig(**cache_kwargs), progress=False).manifest
    sample = np.load(Path(cache_kwargs["cache_dir"]) / "sample.npy").astype(np.float64)
    assert sample.shape == (256, 32)
    scaled = sample * m["norm_scale"]
    assert (scaled**2).sum(-1).mean() == pytest.approx(32, rel=1e-3)


def test_interrupted_build_resumes_to_the_same_cache(cache_kwargs, tmp_path):
    reference = dict(cache_kwargs, cache_dir=str(tmp_path / "reference"))
    build_cache(CacheConfig(**reference), progress=False)

    written = []

    def interrupt(path):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt

    cfg = CacheConfig(**cache_kwargs)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False, on_shard=interrupt)
    partial = sh.read_manifest(cfg.cache_dir)
    assert partial["complete"] is False
    assert sorted(p.name for p in Path(cfg.cache_dir).glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(Path(cfg.cache_dir).glob(".*tmp*"))  # the shard in progress was discarded

    resumed = build_cache(cfg, progress=False)
    assert resumed.tokens_computed == (40 - 24 + 12) * 16  # only the missing shards ran
    assert _files(cfg.cache_dir) == _files(reference["cache_dir"])


def test_deleted_shard_is_rebuilt(cache_kwargs):
    cfg = CacheConfig(**cache_kwargs)
    build_cache(cfg, progress=False)
    before = _files(cfg.cache_dir)
    (Path(cfg.cache_dir) / "val-000001.tar").unlink()
    assert build_cache(cfg, progress=False).tokens_computed == 4 * 16
    assert _files(cfg.cache_dir) == before


@pytest.mark.parametrize(
    "key,value",
    [("hookpoint", "resid_post.2"), ("dtype", "bfloat16"), ("context_length", 32), ("train_tokens", 16 * 30)],
)
def test_mismatched_manifest_is_refused(cache_kwargs, key, value):
    build_cache(CacheConfig(**cache_kwargs), progress=False)
    manifest_key = {"train_tokens": "train_tokens_requested"}.get(key, key)
    with pytest.raises(sh.ManifestMismatchError) as e:
        build_cache(CacheConfig(**dict(cache_kwargs, **{key: value})), progress=False)
    msg = str(e.value)
    old = getattr(CacheConfig(**cache_kwargs), key)
    assert manifest_key in msg and repr(old) in msg and repr(value) in msg
    assert "Delete" in msg and cache_kwargs["cache_dir"] in msg


def test_changed_text_is_refused(cache_kwargs, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(Path(cache_kwargs["corpus"]).read_text())
    kwargs = dict(cache_kwargs, corpus=str(corpus))
    build_cache(CacheConfig(**kwargs), progress=False)
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "text": "one more document"}) + "\n")
    with pytest.raises(sh.ManifestMismatchError, match="source_fingerprint"):
        build_cache(CacheConfig(**kwargs), progress=False)


def test_interrupted_cache_for_another_config_is_refused(cache_kwargs):
    def stop(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(CacheConfig(**cache_kwargs), progress=False, on_shard=stop)
    with pytest.raises(sh.ManifestMismatchError, match="hookpoint"):
        build_cache(CacheConfig(**dict(cache_kwargs, hookpoint="resid_post.0")), progress=False)


def test_bfloat16_cache(cache_kwargs):
    m = build_cache(CacheConfig(**dict(cache_kwargs, dtype="bfloat16")), progress=False).manifest
    block = _read_split(cache_kwargs["cache_dir"], m, "val")[0]
    assert block.acts.dtype == np.uint16
    model = load_model(cache_kwargs["model"], "cpu")
    with torch.inference_mode():
        expected = HookedForward(model, "resid_post.1")(torch.from_numpy(block.tokens[None]).long())[0]
    torch.testing.assert_close(sh.decode_acts(block.acts, "bfloat16"), expected.bfloat16().float(), rtol=0, atol=0)


def test_command_line_reads_a_lightning_config(cache_kwargs, tmp_path):
    config = tmp_path / "fit.yaml"
    data = dict(cache_kwargs, batch_size=64, hookpoint="resid_post.3")  # batch_size: a datamodule-only key
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": 1}, "data": {"class_path": "x", "init_args": data}}))
    result = main(["--config", str(config), "--hookpoint", "resid_post.0", "--quiet"])
    assert result.manifest["hookpoint"] == "resid_post.0"  # flags override the file
    assert result.manifest["context_length"] == 16 and (Path(cache_kwargs["cache_dir"]) / "manifest.json").exists()


def test_subject_dtype_is_recorded_and_an_explicit_one_is_never_silently_reused(cache_kwargs):
    m = build_cache(CacheConfig(**dict(cache_kwargs, subject_dtype="bfloat16")), progress=False).manifest
    assert m["subject_dtype"] == "bfloat16"
    with pytest.raises(sh.ManifestMismatchError, match="subject_dtype"):
        build_cache(CacheConfig(**dict(cache_kwargs, subject_dtype="float32")), progress=False)
    # "auto" accepts what is there (and the manifest says what that is)
    again = build_cache(CacheConfig(**dict(cache_kwargs, subject_dtype="auto")), progress=False)
    assert again.tokens_computed == 0 and again.manifest["subject_dtype"] == "bfloat16"


def test_bf16_subject_activations_stay_close_to_fp32(cache_kwargs):
    """The per-token relative error of bf16 activations against fp32 on the same tokens (the
    benchmark prints the same on the real model)."""
    tokenizer = load_tokenizer(cache_kwargs["model"])
    corpus = CacheConfig(**cache_kwargs).corpus_obj()
    ctx = np.stack([c.tokens for c in list(pack_contexts(corpus.documents("train"), tokenizer, 16))[:8]])
    ids = torch.from_numpy(ctx).long()
    acts = {}
    for dtype in ("float32", "bfloat16"):
        with torch.inference_mode():
            acts[dtype] = HookedForward(load_model(cache_kwargs["model"], "cpu", dtype), "resid_post.1")(ids).float()
    rel = (acts["bfloat16"] - acts["float32"]).norm(dim=-1) / acts["float32"].norm(dim=-1)
    assert rel.median() < 0.02 and rel.max() < 0.1, rel
