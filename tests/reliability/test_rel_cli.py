"""A user's mistakes on the command line: one line naming the key, the value and what to do; no
traceback, no parser dump; --debug brings the traceback back. And hostile token text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_cache_kwargs
from faults import MISTAKES, last_line, python, run, write_cache_config, write_fit_config
from sae_lit.data.cache import CacheConfig, build_cache
from sae_lit.data.cache import main as cache_main
from sae_lit.training.cli import main


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("cli")
    kwargs = tiny_cache_kwargs(root / "cache", tiny_model_dir, tiny_corpus)
    build_cache(CacheConfig(**kwargs), progress=False)
    return write_fit_config(root / "fit.yaml", kwargs, root / "logs", max_steps=2)


@pytest.mark.parametrize("flags,status,words", MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_mistakes_are_one_line(config, tmp_path, capsys, flags, status, words):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *flags])
    err = capsys.readouterr().err
    line = last_line(err)
    assert e.value.code == status, err
    assert line.startswith("error: ") and all(w in line for w in words), line
    assert "Traceback" not in err and "Namespace(" not in err and "Union subtypes" not in err
    assert "usage:" not in err


def test_cache_command_line_mistakes(tmp_path, capsys):
    for argv, words in [
        (["--cache_dir", str(tmp_path / "c"), "--context_length", "x"], ["context_length", "expected int"]),
        (["--cache_dir", str(tmp_path / "c"), "--model", "./missing-model"], ["model './missing-model' does not exist"]),
        (["--cache_dir", str(tmp_path / "none"), "--verify"], ["no manifest.json"]),
    ]:
        with pytest.raises(SystemExit):
            from sae_lit.common import run_cli

            run_cli(cache_main, argv)
        line = last_line(capsys.readouterr().err)
        assert line.startswith("error: ") and all(w in line for w in words), line


@pytest.mark.slow
def test_debug_shows_the_traceback(config, tmp_path):
    base = ["main.py", "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.batch_size", "0"]
    plain = run(python(*base))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert last_line(plain.stderr) == "error: batch_size must be a positive integer, got 0. (--debug shows the traceback)"
    debug = run(python(*base, "--debug"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "batch_size must be a positive integer" in debug.stderr
    cache = run(python("-m", "sae_lit.data.cache", "--config", write_cache_config(tmp_path / "c.yaml", {
        "cache_dir": str(tmp_path / "c"), "model": "/no/such/model"}), "--quiet"))
    assert cache.returncode == 1 and last_line(cache.stderr).startswith("error: model '/no/such/model' does not exist")


def test_hostile_token_text_is_escaped_in_the_dashboard(tmp_path, tiny_model_dir):
    """Text that is markup, script or a path reaches the dashboard only as escaped text."""
    from sae_lit.dashboard.__main__ import main as dashboard
    from sae_lit.data import shards as sh
    from sae_lit.model.formats import export_sae
    from sae_lit.model.sae import TopKSAE

    hostile = ['</script><script>alert(1)</script>', '<img src=x onerror="alert(2)">', '"><svg onload=alert(3)>',
               "{{7*7}} ${7*7} ../../etc/passwd", "<!-- --><b>&amp;</b>", "'); DROP TABLE x; --"]
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"h{i}", "text": " ".join(hostile[i % 6:] + hostile[: i % 6]) * 3})
                                for i in range(40)) + "\n")
    kwargs = tiny_cache_kwargs(tmp_path / "cache", tiny_model_dir, str(corpus))
    m = build_cache(CacheConfig(**kwargs), progress=False).manifest
    sae = TopKSAE(m["d_in"], 16, k=4, normalize="none", seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    export_sae(sae, tmp_path / "sae")
    dashboard(["--sae", str(tmp_path / "sae"), "--cache", kwargs["cache_dir"], "--out", str(tmp_path / "site"),
               "--progress", "false", "--precision", "float32", "--top_n", "4"])
    pages = list((tmp_path / "site").rglob("*.html"))
    assert len(pages) == 17
    texts = [page.read_text() for page in pages]
    for text in texts:
        assert "<img" not in text and "<svg onload" not in text and "<script>alert" not in text
        assert "<b>&amp;</b>" not in text and "<!-- -->" not in text
    shown = "".join(texts)
    assert "&lt;" in shown and "&gt;" in shown and "&quot;" in shown  # shown, as text
    assert list(sh.iter_shard(f"{kwargs['cache_dir']}/val-000000.tar"))  # the text really is in the cache
    assert not Path("/etc/passwd.html").exists()
