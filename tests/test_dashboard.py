"""Latent dashboard: the streaming statistics against a brute-force pass over a tiny cache, the
CLI, and the built site in headless Chromium (skipped when chromium / chromedriver are absent)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_cache_kwargs
from sae_lit.data import shards as sh
from sae_lit.data.cache import CacheConfig, build_cache
from sae_lit.dashboard.build import iter_split, load_n2g, scan
from sae_lit.dashboard.stats import HIST_PER_OCTAVE, NUM_BANDS, NUM_BINS, SegmentedTopK, hist_bin
from sae_lit.evals.adapter import densify
from sae_lit.model.formats import export_sae
from sae_lit.model.sae import TopKSAE
from sae_lit.data.streams import RowFilter

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_model_dir, tiny_corpus):
    kwargs = tiny_cache_kwargs(tmp_path_factory.mktemp("dash") / "cache", tiny_model_dir, tiny_corpus)
    build_cache(CacheConfig(**kwargs), progress=False)
    return kwargs["cache_dir"]


def tiny_sae(d_in: int, activation: str = "topk") -> TopKSAE:
    sae = TopKSAE(d_in, 24, k=4, activation=activation, normalize="none", seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    return sae


def brute_force(sae, cache_dir, manifest, split):
    """Dense codes of every position of the split: [blocks, T, n], NaN where not scored."""
    rows = RowFilter(manifest["dtype"], True, manifest.get("outlier_threshold"))
    out = []
    for block in iter_split(cache_dir, manifest, split):
        mask = torch.from_numpy(rows.mask(block.acts))
        codes = torch.full((len(mask), sae.num_latents), math.nan)
        v, i = sae.encode(sh.decode_acts(block.acts, manifest["dtype"])[mask])
        codes[mask] = densify(v.float(), i, sae.num_latents)
        out.append(codes)
    return torch.stack(out)


# --- the streaming pass ------------------------------------------------------------------------


def test_segmented_topk_matches_sorting():
    g = torch.Generator().manual_seed(0)
    groups, size = 7, 5
    top = SegmentedTopK(groups, size, {"id": ((), torch.long, -1)})
    all_g, all_k = [], []
    for step in range(12):
        grp = torch.randint(groups - 1, (40,), generator=g)  # the last group never gets entries
        key = torch.rand(40, generator=g)
        ids = torch.arange(40) + 40 * step
        top.update(grp, key, id=ids)
        all_g.append(grp)
        all_k.append(key)
    all_g, all_k = torch.cat(all_g), torch.cat(all_k)
    for gi in range(groups):
        mine = all_k[all_g == gi]
        expect, order = mine.sort(descending=True)
        m = min(size, mine.numel())
        assert torch.equal(top.keys[gi, :m], expect[:m])
        assert torch.equal(top.fields["id"][gi, :m], (all_g == gi).nonzero().squeeze(1)[order[:m]])
        assert torch.isinf(top.keys[gi, m:]).all() and (top.fields["id"][gi, m:] == -1).all()


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_streaming_stats_equal_brute_force(tiny_cache, activation):
    manifest = sh.read_manifest(tiny_cache)
    T = manifest["context_length"]
    sae = tiny_sae(manifest["d_in"], activation)
    left, right, top_n, S = 5, 3, 3, 2
    # 4-block chunks: the per-latent selections are merged across ten chunks.
    stats, tokens, blocks, _ = scan(sae, tiny_cache, manifest, "train", top_n=top_n, samples=S, left=left, right=right,
                                    chunk_tokens=4 * T, precision="float32", progress=False)
    dense = brute_force(sae, tiny_cache, manifest, "train")  # [B, T, n]
    B, _, n = dense.shape
    assert tokens.shape == (B, T) and len(blocks) == B
    scored = ~dense[..., 0].isnan()
    assert stats.tokens_scored == int(scored.sum()) == B * (T - 1)  # BOS left out, no outliers here
    flat = dense.reshape(B * T, n)
    fired = flat.nan_to_num(0) > 0
    assert torch.equal(stats.count, fired.sum(0))
    assert 0 < int((stats.count > top_n).sum()) and int((stats.count > 0).sum()) > n // 2
    torch.testing.assert_close(stats.sum, flat.nan_to_num(0).double().sum(0), rtol=1e-5, atol=1e-5)

    hist = torch.zeros(n, NUM_BINS, dtype=torch.long)
    for j in range(n):
        hist[j] = torch.bincount(hist_bin(flat[fired[:, j], j]), minlength=NUM_BINS)
    assert torch.equal(stats.hist, hist)

    def window(tok: int, j: int) -> torch.Tensor:
        b, p = divmod(tok, T)
        w = torch.full((left + 1 + right,), math.nan)
        lo, hi = max(0, p - left), min(T, p + right + 1)
        w[lo - (p - left) : hi - (p - left)] = dense[b, lo:hi, j]
        return w

    for j in range(n):
        col = flat[:, j].nan_to_num(-1.0)
        m = min(top_n, int(fired[:, j].sum()))
        # Equal values are real (the same token right after BOS): the first seen is kept.
        values, ids = (t[:m] for t in col.sort(descending=True, stable=True))
        torch.testing.assert_close(stats.top.keys[j, :m], values)
        assert stats.top.fields["token"][j, :m].tolist() == ids.tolist()
        assert (stats.top.fields["token"][j, m:] == -1).all()
        for s in range(m):
            torch.testing.assert_close(stats.top.fields["window"][j, s].float(), window(int(ids[s]), j),
                                       rtol=1e-3, atol=1e-3, equal_nan=True)
        torch.testing.assert_close(stats.max[j], col.max().clamp_min(0))

        # samples: min(S, firings in the band) per octave band, each a real firing in that band
        per_band = hist[j].view(NUM_BANDS, HIST_PER_OCTAVE).sum(-1)
        for band in range(NUM_BANDS):
            g = j * NUM_BANDS + band
            toks = stats.samples.fields["token"][g]
            kept = toks[toks >= 0].tolist()
            assert len(kept) == min(S, int(per_band[band]))
            assert len(set(kept)) == len(kept)
            for s, tok in enumerate(kept):
                v = float(stats.samples.fields["value"][g, s])
                assert v == pytest.approx(float(flat[tok, j]), rel=1e-5)
                assert int(hist_bin(torch.tensor([v]))) // HIST_PER_OCTAVE == band
                torch.testing.assert_close(stats.samples.fields["window"][g, s].float(), window(tok, j),
                                           rtol=1e-3, atol=1e-3, equal_nan=True)


def test_bf16_encoder_agrees_with_fp32(tiny_cache):
    manifest = sh.read_manifest(tiny_cache)
    sae = tiny_sae(manifest["d_in"])
    ref, *_ = scan(sae, tiny_cache, manifest, "train", precision="float32", progress=False)
    fast, _, _, used = scan(sae, tiny_cache, manifest, "train", precision="bfloat16", progress=False)
    assert used == "bfloat16"
    torch.testing.assert_close(fast.max, ref.max, rtol=2e-2, atol=1e-2)
    # bf16 rounding swaps some near-ties at the k-th place (about 1% of firings, also on the
    # quickstart SAE); strong activations are unaffected.
    assert (fast.count - ref.count).abs().sum() <= 0.03 * ref.count.sum()


def test_n2g_report_formats(tmp_path):
    ex = {"3": {"patterns": [[" the", "*", "\n"]], "precision": 0.5, "recall": None, "trie": {}}}
    (tmp_path / "n2g_explanations.json").write_text(json.dumps(ex))
    (tmp_path / "report.json").write_text(json.dumps({"details": {"n2g": {"explanations_file": "n2g_explanations.json"}}}))
    (tmp_path / "inline.json").write_text(json.dumps({"details": {"n2g": {"explanations": ex}}}))
    for name in ("report.json", "inline.json", "n2g_explanations.json"):
        got = load_n2g(tmp_path / name)
        assert list(got) == [3] and "trie" not in got[3] and got[3]["precision"] == 0.5


# --- the site ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tiny_cache, tmp_path_factory):
    """The dashboard of the tiny SAE, built through the CLI from a YAML config."""
    from sae_lit.dashboard.__main__ import main

    root = tmp_path_factory.mktemp("site")
    manifest = sh.read_manifest(tiny_cache)
    sae = tiny_sae(manifest["d_in"])
    with torch.no_grad():
        sae.b_enc[0] = -1e3  # a dead latent
    export_sae(sae, root / "sae")
    stats, *_ = scan(sae, tiny_cache, manifest, "val", precision="float32", progress=False)
    assert int(stats.count[0]) == 0
    explained = [int(j) for j in stats.count.argsort(descending=True)[:2]]
    ex = {str(j): {"patterns": [[" the", "*"], ["</script><!--<b>&", "\n"]], "precision": 0.75, "recall": 0.5, "f1": 0.6,
                   "predicted": 4, "fired": 6, "trie": {}} for j in explained}
    (root / "n2g_explanations.json").write_text(json.dumps(ex))
    (root / "report.json").write_text(json.dumps({"details": {"n2g": {"explanations_file": "n2g_explanations.json"}}}))
    config = root / "dashboard.yaml"
    config.write_text(f"sae: {root / 'sae'}\ncache: {tiny_cache}\nout: {root / 'out'}\nprogress: false\n")
    main(["--config", str(config), "--eval-report", str(root / "report.json"), "--top_n", "6", "--precision", "float32"])
    return {"out": root / "out", "n": 24, "explained": explained, "busiest": explained[0], "dead": int((stats.count == 0).sum())}


def test_site_files(site):
    out = site["out"]
    assert (out / "index.html").is_file() and (out / "style.css").is_file()
    pages = sorted(out.glob("latents/*.html"))
    assert len(pages) == site["n"]
    text = (out / "latents" / f"{site['busiest']}.html").read_text()
    assert "&lt;/script&gt;&lt;!--&lt;b&gt;&amp;" in text and "<b>&" not in text  # pattern tokens are escaped
    index = (out / "index.html").read_text()
    assert index.count("</script>") == 2 and "<!--" not in index  # nor can they end the data block
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    assert "<svg" in text and 'class="a m"' in text
    assert "never fired" in (out / "latents" / "0.html").read_text()


def test_site_of_other_formats(tiny_cache, tmp_path, caplog):
    """--sae takes any source: here a sparsify folder of another layer (warned about) and a live
    object from Python; the page names the format."""
    from sae_lit.dashboard import DashboardConfig, build_dashboard

    sae = tiny_sae(sh.read_manifest(tiny_cache)["d_in"])
    export_sae(sae, tmp_path / "run" / "layers.2", format="sparsify")
    caplog.set_level("WARNING")
    index = build_dashboard(DashboardConfig(sae=str(tmp_path / "run"), subfolder="layers.2", cache=tiny_cache,
                                            out=str(tmp_path / "out"), logits=False, progress=False, precision="float32"))
    assert "model.layers.2" in caplog.text and "(sparsify)" in Path(index).read_text()
    build_dashboard(DashboardConfig(sae=sae, cache=tiny_cache, out=str(tmp_path / "live"), logits=False, progress=False))
    assert len(list((tmp_path / "live" / "latents").glob("*.html"))) == 24


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if binary is None or driver_path is None:
        pytest.skip("headless browser tests need chromium and chromedriver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never goes looking for (or downloading) one.
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _ids(driver) -> list[int]:
    from selenium.webdriver.common.by import By

    return [int(td.text) for td in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr td:first-child")]


def test_index_page_lists_searches_and_sorts(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((site["out"] / "index.html").as_uri())
    assert _errors(browser) == []
    assert _ids(browser) == list(range(site["n"]))
    browser.save_screenshot(str(ARTIFACTS / "index.png"))

    data = browser.execute_script("return JSON.parse(document.getElementById('data').textContent)")
    col = {c: i for i, c in enumerate(data["columns"])}
    rows = data["rows"]
    # search: a top-activating token of the busiest latent
    word = rows[site["busiest"]][col["top_tokens"]][0].lower()
    text = lambda r: " ".join([str(r[col["id"]]), *r[col["top_tokens"]], *r[col["logits"]], *r[col["n2g"]]]).lower()
    expect = [r[0] for r in rows if word in text(r)]
    box = browser.find_element(By.ID, "q")
    box.send_keys(word)
    assert _ids(browser) == expect and site["busiest"] in expect
    box.clear()
    box.send_keys("no such token anywhere")
    assert _ids(browser) == [] and "no latents match" in browser.find_element(By.ID, "count").text
    box.clear()
    box.send_keys("x")  # clear() fires no input event; typing does
    box.send_keys("\b")
    assert len(_ids(browser)) == site["n"]

    # sort by max activation: descending first, blanks (dead latents) last; then ascending
    browser.find_element(By.CSS_SELECTOR, 'th[data-k="max"]').click()
    maxes = [rows[i][col["max"]] for i in _ids(browser)]
    values = [m for m in maxes if m is not None]
    assert values == sorted(values, reverse=True) and maxes[: len(values)] == values
    assert len(values) == site["n"] - site["dead"]
    browser.find_element(By.CSS_SELECTOR, 'th[data-k="max"]').click()
    values = [rows[i][col["max"]] for i in _ids(browser) if rows[i][col["max"]] is not None]
    assert values == sorted(values)

    Select(browser.find_element(By.ID, "filter")).select_by_value("dead")
    assert _ids(browser) == [0]
    Select(browser.find_element(By.ID, "filter")).select_by_value("n2g")
    assert sorted(_ids(browser)) == sorted(site["explained"])
    browser.save_screenshot(str(ARTIFACTS / "index-n2g.png"))
    assert _errors(browser) == []


def test_latent_page_shows_contexts_and_histogram(site, browser):
    from selenium.webdriver.common.by import By

    j = site["busiest"]
    browser.get((site["out"] / "latents" / f"{j}.html").as_uri())
    assert _errors(browser) == []
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Latent {j}"
    shaded = browser.find_elements(By.CSS_SELECTOR, ".ctx .a")
    assert shaded
    colours = {browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", e) for e in shaded[:20]}
    assert all(re.fullmatch(r"rgba?\(255, 122, 0(, 0?\.\d+)?\)", c) for c in colours), colours
    assert shaded[0].get_attribute("title")  # the value as tooltip
    assert browser.find_elements(By.CSS_SELECTOR, ".ctx .a.m")  # the token each context is about
    assert browser.find_elements(By.CSS_SELECTOR, "svg.hist rect.bar")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.logits tr")) == 11
    assert browser.find_elements(By.CSS_SELECTOR, ".n2g .pat")
    assert browser.find_elements(By.CSS_SELECTOR, ".band .ctx")
    browser.save_screenshot(str(ARTIFACTS / f"latent-{j}.png"))
    browser.find_element(By.LINK_TEXT, "all latents").click()
    assert browser.current_url.endswith("index.html") or "index.html#" in browser.current_url
    assert _errors(browser) == []


def test_shipped_config_parses():
    from sae_lit.dashboard.__main__ import parser

    root = Path(__file__).resolve().parent.parent
    cfg = parser().parse_args(["--config", str(root / "configs" / "dashboard.yaml")])
    assert cfg.sae.endswith("version_0/sae") and cfg.cache == "data/cache/quickstart"
    assert cfg.eval_report.endswith("eval/report.json") and cfg.precision == "auto"
