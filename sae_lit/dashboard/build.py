"""Building the dashboard: one pass over a cache split, logit effects, N2G explanations, pages."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_lit.dashboard.render import write_site
from sae_lit.dashboard.stats import LatentStats
from sae_lit.common import bf16_speedup
from sae_lit.data import shards as sh
from sae_lit.data.streams import RowFilter
from sae_lit.evals.compat import check_sae_matches_data

log = logging.getLogger(__name__)


@dataclass
class DashboardData:
    """Everything the pages show; put together by ``build_dashboard``, written by ``render.write_site``."""

    stats: LatentStats
    tokens: np.ndarray  # [blocks, T] int32, blocks in the order scanned
    blocks: list[dict]  # per scanned block: {"index", "docs"} (docs: [{"id", "pos"}] from meta.json)
    info: dict  # SAE / cache / run facts for the index header
    logits: dict | None = None  # {"top_ids", "top_values", "bottom_ids", "bottom_values"}: [n, m] tensors
    n2g: dict[int, dict] = field(default_factory=dict)
    decode: Callable[[int], str] | None = None  # token id -> text
    special_ids: frozenset = frozenset()


# --- the cache -----------------------------------------------------------------------------------


def iter_split(cache_dir: str | Path, manifest: dict, split: str) -> Iterator[sh.Block]:
    shape = (int(manifest["context_length"]), int(manifest["d_in"]))
    if split not in manifest["splits"]:
        raise KeyError(f"{cache_dir}: the cache has no {split!r} split (it has {sorted(manifest['splits'])})")
    for s in manifest["splits"][split]["shards"]:
        yield from sh.iter_shard(str(Path(cache_dir) / s["file"]), s["blocks"], shape)


def _chunks(blocks: Iterator[sh.Block], tokens_per_chunk: int, max_tokens: int | None) -> Iterator[list[sh.Block]]:
    chunk, size, total = [], 0, 0
    for block in blocks:
        if max_tokens is not None and total >= max_tokens:
            break
        chunk.append(block)
        size += len(block.tokens)
        total += len(block.tokens)
        if size >= tokens_per_chunk:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --- encoding ------------------------------------------------------------------------------------


def _bf16_is_faster(d_in: int, n: int) -> bool:
    """CPUs with AMX / AVX512-BF16 run the encoder's bf16 GEMM several times faster than fp32,
    others much slower: measured at the encoder's shape."""
    return bf16_speedup(512, d_in, min(n, 4096)) > 2.0


def make_encoder(sae, precision: str = "auto", device: str | torch.device = "cpu", batch: int = 4096):
    """Raw activations [R, d] -> (values, indices) on the CPU, in batches of ``batch`` rows.

    precision "bfloat16" computes a TopK SAE's encoder GEMM in bf16 (fp32 accumulation): values
    within ~0.5% of fp32 and a different selection only for near-ties at the k-th place; ten
    times the speed on CPUs with AMX. "auto" picks it where it is faster (and on GPUs). Other
    activations always run in fp32 through ``sae.encode``."""
    device = torch.device(device)
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" or _bf16_is_faster(sae.d_in, sae.num_latents) else "float32"
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if sae.activation != "topk":
        precision = "float32"
    if precision == "bfloat16":
        W_enc_t = sae.W_enc.detach().t().to(torch.bfloat16)
        b_enc = sae.b_enc.detach().to(torch.bfloat16)

    @torch.no_grad()
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vs, ids = [], []
        for lo in range(0, x.shape[0], batch):
            xb = x[lo : lo + batch].to(device)
            if precision == "bfloat16":
                # sae.pre_acts with the centring (x - b_dec) in fp32, before the rounding: the
                # residual stream's large shared component would otherwise eat the bf16 mantissa.
                x_norm, _ = sae.normalize_input(xb)
                v, i = sae.select(torch.addmm(b_enc, (x_norm - sae.b_dec).to(torch.bfloat16), W_enc_t))
            else:
                v, i = sae.encode(xb)
            vs.append(v.float().cpu())
            ids.append(i.cpu())
        if not vs:
            return torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.long)
        return torch.cat(vs), torch.cat(ids)

    encode.precision = precision
    return encode


# --- the pass ------------------------------------------------------------------------------------


def scan(sae, cache_dir: str | Path, manifest: dict, split: str = "val", *, top_n: int = 20, samples: int = 4,
         left: int = 24, right: int = 8, exclude_bos: bool = True, exclude_outliers: bool = True,
         max_tokens: int | None = None, chunk_tokens: int = 8192, precision: str = "auto",
         device: str = "cpu", seed: int = 0, progress: bool = True) -> tuple[LatentStats, np.ndarray, list[dict], str]:
    """One streaming pass over ``split``. Scores the same positions as training and validation
    (the data module's ``exclude_bos`` / ``exclude_outliers`` with the cache's threshold).
    Returns (stats, tokens [blocks, T], per-block info, the encoder precision used)."""
    T = int(manifest["context_length"])
    dtype = manifest["dtype"]
    rows = RowFilter(dtype, exclude_bos, manifest.get("outlier_threshold") if exclude_outliers else None)
    stats = LatentStats(sae.num_latents, T, top_n=top_n, samples=samples, left=left, right=right, seed=seed)
    encode = make_encoder(sae, precision, device)
    total = int(manifest["splits"][split]["tokens"])
    if max_tokens is not None:
        total = min(total, max_tokens)
    tokens, blocks = [], []
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"latent stats ({split})", disable=not progress)
    for chunk in _chunks(iter_split(cache_dir, manifest, split), chunk_tokens, max_tokens):
        first_token = len(tokens) * T
        acts = torch.cat([sh.decode_acts(b.acts, dtype) for b in chunk])
        scored = torch.from_numpy(np.concatenate([rows.mask(b.acts) for b in chunk]))
        scored_rows = scored.nonzero().squeeze(1)
        values, indices = encode(acts[scored_rows])
        fired = values > 0
        row = scored_rows[:, None].expand_as(indices)[fired]
        stats.add(row, indices[fired], values[fired], scored, first_token)
        for b in chunk:
            tokens.append(b.tokens.astype(np.int32))
            docs = (b.meta or {}).get("docs") or []
            blocks.append({"index": b.index, "docs": [{"id": d.get("id"), "pos": d.get("pos", 0)} for d in docs]})
        bar.update(acts.shape[0])
    bar.close()
    if not tokens:
        raise ValueError(f"{cache_dir}: the {split} split has no blocks")
    return stats, np.stack(tokens), blocks, encode.precision


# --- logit effects -------------------------------------------------------------------------------


@torch.no_grad()
def logit_effects(model, W_dec: torch.Tensor, m: int = 10, chunk: int = 1024, dtype=torch.float32) -> dict:
    """The direct effect of each latent's decoder direction on the logits, W_dec @ W_U (the
    layers after the hookpoint and the final norm are ignored): the m largest and smallest
    entries per latent, as [n, m] tensors. ``dtype`` of the GEMM (bf16 where it is fast)."""
    W_U = model.get_output_embeddings().weight.detach().cpu().to(dtype)  # [V, d]
    dirs = W_dec.detach().cpu().to(dtype)
    m = min(m, W_U.shape[0])
    out = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for lo in range(0, dirs.shape[0], chunk):
        logits = dirs[lo : lo + chunk] @ W_U.t()
        top = logits.topk(m, dim=-1)
        bottom = logits.topk(m, dim=-1, largest=False)
        out["top_ids"].append(top.indices)
        out["top_values"].append(top.values.float())
        out["bottom_ids"].append(bottom.indices)
        out["bottom_values"].append(bottom.values.float())
    return {k: torch.cat(v) for k, v in out.items()}


# --- N2G -----------------------------------------------------------------------------------------


def load_n2g(path: str | Path) -> dict[int, dict]:
    """Per-latent N2G explanations from an eval report (``report.json``: details.n2g, with the
    explanations inline or in the ``explanations_file`` next to it) or from the explanations
    file itself."""
    path = Path(path)
    data = json.loads(path.read_text())
    n2g = data.get("details", {}).get("n2g") if isinstance(data, dict) and "details" in data else None
    if n2g is None:
        explanations = data
    elif "explanations" in n2g:
        explanations = n2g["explanations"]
    elif "explanations_file" in n2g:
        explanations = json.loads((path.parent / n2g["explanations_file"]).read_text())
    else:
        log.warning("%s has no N2G explanations (details.n2g lacks them)", path)
        explanations = {}
    out = {}
    for key, ex in (explanations or {}).items():
        if str(key).isdigit() and isinstance(ex, dict):
            out[int(key)] = {k: v for k, v in ex.items() if k != "trie"}
    return out


def token_decoder(tokenizer) -> Callable[[int], str]:
    """Token id -> its text. Decoding one id alone drops the leading space of SentencePiece
    tokens ("▁the" -> "the"), which matters when tokens are shown one by one."""

    def decode(t: int) -> str:
        text = tokenizer.decode([t])
        piece = tokenizer.convert_ids_to_tokens(t)
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    return decode


# --- the whole build -----------------------------------------------------------------------------


@dataclass
class DashboardConfig:
    """What to build the dashboard of, and how (python -m sae_lit.dashboard, configs/dashboard.yaml).

    Args:
        sae: the SAE: a folder or file in any format sae_lit reads (ours, SAELens, sparsify, OpenAI
            .pt, dictionary_learning), hf://owner/repo[/subfolder]; from Python also a live SAE
            (TopKSAE, SAELens SAE, sparsify SparseCoder).
        subfolder: folder inside ``sae`` (a hub repository's layers.8, say).
        revision: hub branch, tag or commit of ``sae``.
        cache: activation cache folder (manifest.json + shards) built for the SAE's model and hookpoint.
        out: output folder; index.html, style.css and latents/<id>.html are written there.
        eval_report: eval report.json (or n2g_explanations.json) with N2G explanations; None: no N2G.
        split: cache split to scan ("val" or "train").
        top_n: top-activating contexts kept per latent.
        samples_per_band: random contexts kept per latent and octave of activation value.
        bands_shown: octave bands shown per latent page, strongest first.
        context_left: tokens shown before the activating token.
        context_right: tokens shown after it.
        max_tokens: stop after this many tokens of the split (whole blocks); None scans it all.
        exclude_bos: leave each block's BOS position out of the statistics, as training and validation do.
        exclude_outliers: leave massive-activation outliers (norm above the cache's threshold) out too.
        logits: compute each latent's logit effect (loads the subject model).
        num_logits: promoted / suppressed tokens listed per latent.
        model: subject model for the tokenizer and unembedding; None: the one in the cache's manifest.
        precision: encoder GEMM precision: "auto", "float32" or "bfloat16" (see make_encoder).
        device: where the SAE encodes ("cpu", "cuda", ...).
        seed: seeds the random samples.
        progress: show progress bars.
    """

    sae: str
    cache: str
    out: str
    subfolder: str | None = None
    revision: str | None = None
    eval_report: str | None = None
    split: str = "val"
    top_n: int = 20
    samples_per_band: int = 4
    bands_shown: int = 5
    context_left: int = 24
    context_right: int = 8
    max_tokens: int | None = None
    exclude_bos: bool = True
    exclude_outliers: bool = True
    logits: bool = True
    num_logits: int = 10
    model: str | None = None
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


@dataclass
class Inputs:
    """Everything the build reads before the scan, so that a wrong path fails before a long pass."""

    manifest: dict  # the cache's manifest.json
    sae: Any  # the SAE (sae_lit.model.formats.load_sae)
    tokenizer: Any  # the subject model's tokenizer
    n2g: dict[int, dict]  # N2G explanations per latent (none without an eval report)


def load_inputs(cfg: DashboardConfig) -> Inputs:
    from sae_lit.data.subject import load_tokenizer, published_sae_hook
    from sae_lit.model.formats import load_sae

    manifest = sh.read_manifest(cfg.cache)
    if manifest is None or not manifest.get("complete"):
        raise sh.CacheError(f"{cfg.cache}: no complete activation cache (manifest.json with complete: true)")
    sae = load_sae(cfg.sae, device=cfg.device, subfolder=cfg.subfolder, revision=cfg.revision)
    name = f"the SAE {cfg.sae if isinstance(cfg.sae, (str, Path)) else type(cfg.sae).__name__}"
    metadata = (getattr(sae, "export_cfg", None) or {}).get("metadata") or {}
    sae_hook = published_sae_hook(metadata, cfg.model or manifest["model"], name)
    check_sae_matches_data(sae.d_in, sae_hook, int(manifest["d_in"]), manifest.get("hook_name"),
                           sae_name=name, data_name=f"the cache {cfg.cache}")
    tokenizer = load_tokenizer(cfg.model or manifest["model"])
    n2g = load_n2g(cfg.eval_report) if cfg.eval_report else {}
    return Inputs(manifest=manifest, sae=sae, tokenizer=tokenizer, n2g=n2g)


def subject_logit_effects(model: str, W_dec: torch.Tensor, m: int = 10, dtype=torch.float32) -> dict:
    """``logit_effects`` of the subject model, loaded for it (CPU, float32) and released after."""
    from sae_lit.data.subject import load_model

    return logit_effects(load_model(model, "cpu", "float32"), W_dec, m, dtype=dtype)


def site_info(cfg: DashboardConfig, inputs: Inputs, stats: LatentStats, blocks: list[dict], precision: str) -> dict:
    """The index page's title and facts (SAE, cache, what was scored)."""
    manifest, sae = inputs.manifest, inputs.sae
    export_cfg = getattr(sae, "export_cfg", {}) or {}
    title = f"{manifest.get('model_name', manifest['model'])} · {manifest.get('hook_name', manifest['hookpoint'])} · " \
            f"{sae.num_latents:,} latents"
    facts = {
        "SAE": (str(cfg.sae) if isinstance(cfg.sae, (str, Path)) else type(cfg.sae).__name__)
               + (f" / {cfg.subfolder}" if cfg.subfolder else "")
               + (f" ({export_cfg['format']})" if "format" in export_cfg else ""),
        "architecture": f"{export_cfg.get('architecture', sae.activation)}"
                        + (f", k = {sae.k}" if sae.activation == "topk" else ""),
        "d_in × latents": f"{sae.d_in} × {sae.num_latents:,}",
        "model": str(manifest.get("model_name", manifest["model"])),
        "hookpoint": f"{manifest['hookpoint']} ({manifest.get('hook_name', '')})",
        "cache": f"{cfg.cache} ({cfg.split} split, {len(blocks):,} blocks of {manifest['context_length']} tokens)",
        "scored": f"{stats.tokens_scored:,} tokens" + (" (BOS excluded" if cfg.exclude_bos else " (BOS included")
                  + (", outliers excluded)" if cfg.exclude_outliers and manifest.get("outlier_threshold") else ")"),
        "encoder precision": precision,
        "N2G report": str(cfg.eval_report) if cfg.eval_report else "none",
    }
    return {"title": title, "facts": facts, "bands_shown": cfg.bands_shown}


def build_dashboard(cfg: DashboardConfig) -> Path:
    """Build the static latent dashboard of an SAE on a cached activation split.

    In named steps: load_inputs, scan, subject_logit_effects, site_info, render.write_site.
    Returns the index page."""
    start = time.perf_counter()
    inputs = load_inputs(cfg)
    loaded = time.perf_counter()
    stats, tokens, blocks, precision = scan(
        inputs.sae, cfg.cache, inputs.manifest, cfg.split, top_n=cfg.top_n, samples=cfg.samples_per_band,
        left=cfg.context_left, right=cfg.context_right, exclude_bos=cfg.exclude_bos,
        exclude_outliers=cfg.exclude_outliers, max_tokens=cfg.max_tokens, precision=cfg.precision,
        device=cfg.device, seed=cfg.seed, progress=cfg.progress,
    )
    scanned = time.perf_counter()
    effects = None
    if cfg.logits:
        effects = subject_logit_effects(cfg.model or inputs.manifest["model"], inputs.sae.W_dec, cfg.num_logits,
                                        dtype=torch.bfloat16 if precision == "bfloat16" else torch.float32)
    logits_done = time.perf_counter()
    data = DashboardData(
        stats=stats, tokens=tokens, blocks=blocks, info=site_info(cfg, inputs, stats, blocks, precision),
        logits=effects, n2g=inputs.n2g, decode=token_decoder(inputs.tokenizer),
        special_ids=frozenset(getattr(inputs.tokenizer, "all_special_ids", []) or []),
    )
    index = write_site(data, cfg.out, progress=cfg.progress)
    done = time.perf_counter()
    print(f"dashboard: {stats.tokens_scored:,} tokens, {stats.num_latents:,} latents -> {index}\n"
          f"  wall time {done - start:.1f} s (SAE/tokenizer/N2G {loaded - start:.1f} s, scan {scanned - loaded:.1f} s, "
          f"model/logits {logits_done - scanned:.1f} s, pages {done - logits_done:.1f} s)")
    return index
