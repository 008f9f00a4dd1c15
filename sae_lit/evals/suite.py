"""The whole evaluation suite: what it needs (EvalData), what it costs (EvalConfig budgets), and
one function that runs the enabled evals and returns a JSON-ready report plus figures.

Used by the callbacks (during validation and `python main.py test`) and by
`python -m sae_lit.evals`; nothing here knows about Lightning.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lit.common import acts_of
from sae_lit.data.source import ActivationSource, CachedActivations
from sae_lit.data.subject import load_model, load_tokenizer
from sae_lit.evals.ablation import ablation_sparsity
from sae_lit.evals.adapter import SAEAdapter, as_adapter
from sae_lit.evals.downstream import downstream_loss
from sae_lit.evals.n2g import filler_token, n2g_eval
from sae_lit.evals.probe_tasks import builtin_snippets, load_jsonl_task, vader_lexicon
from sae_lit.evals.probes import probe_eval
from sae_lit.evals.progressive import progressive_recovery
from sae_lit.evals.result import EvalResult
from sae_lit.evals.shrinkage import shrinkage

log = logging.getLogger(__name__)

EVALS = ("downstream", "shrinkage", "progressive", "probes", "ablation", "n2g")
# Raised when an eval starts measuring something else (issue 13: probes on pre-activations,
# ablation over T = 16 with the median removed, N2G as the reference code, the JumpReLU sweep,
# intervals): a sweep re-evaluates finished runs whose recorded version is older.
EVAL_VERSIONS = {"downstream": 1, "shrinkage": 2, "progressive": 2, "probes": 2, "ablation": 2, "n2g": 2}
LM_EVALS = {"downstream", "probes", "ablation", "n2g"}  # need the subject LM and token blocks


@dataclass
class EvalConfig:
    # list[str]: evals to run, any of downstream, shrinkage, progressive, probes, ablation, n2g
    evals: list[str] = field(default_factory=lambda: list(EVALS))
    # int: held-out contexts (cache blocks, BOS first) for the downstream loss; 3 LM forwards each
    downstream_contexts: int = 32
    # bool: keep BOS unspliced and unscored (SAEs are trained without BOS)
    exclude_bos: bool = True
    # bool: leave out tokens above the cache's outlier threshold, as training does (the data
    # module's exclude_outliers): unspliced in the downstream loss, dropped from shrinkage/progressive
    exclude_outliers: bool = True
    # int: contexts per LM forward (downstream, probes)
    lm_batch_size: int = 8
    # int: held-out tokens (BOS excluded) for shrinkage and progressive recovery
    activation_tokens: int = 8192
    # int: training tokens for the JumpReLU threshold calibration
    calibration_tokens: int = 8192
    # int: tokens (of activation_tokens) and solver iterations for the shrinkage refit; a dense
    # ReLU code early in training has hundreds of latents per token, and costs ~m^2 per iteration
    shrinkage_tokens: int = 2048
    shrinkage_max_iter: int = 500
    # int: probe snippets of stdlib code / pydoc prose / KJV per genre (7 genres); enough that most
    # tasks reach probe_max_per_class in both splits (the rarest classes cannot)
    probe_code_snippets: int = 384
    probe_pydoc_snippets: int = 192
    probe_kjv_snippets_per_genre: int = 64
    # int: LM tokens per probe snippet
    probe_snippet_tokens: int = 64
    # int: examples per class and split (train: the paper's in-sample fit; test: held-out) of each task
    probe_max_per_class: int = 1000
    # list[str]: extra probe tasks, JSONL files of {"text", "label", "span"?}
    probe_tasks_jsonl: list[str] = field(default_factory=list)
    # int: ablation sparsity: contexts, positions per context and active latents per position
    # (as many random residual channels too): 64 x 2 x 4 = 512 (latent, position) pairs. The
    # ablations of one position share a forward of its 16 positions (one batch row each)
    ablation_contexts: int = 64
    ablation_positions_per_context: int = 2
    ablation_latents_per_position: int = 4
    # int: tokens per ablation context (a prefix of a cache block; positions t with t + window <= it)
    ablation_context_length: int = 64
    # int: positions scored from the ablated one on (the paper's T = 16)
    ablation_window: int = 16
    # int: latents explained by N2G and held-out blocks used (half explain, half test)
    n2g_latents: int = 32
    n2g_blocks: int = 64
    # int: top activations (one per block) and random positive activations explaining each latent
    n2g_top_examples: int = 8
    n2g_random_examples: int = 8
    # int | None: longest suffix tried before the whole-context fallback (None: every length, the
    # reference's; costs ~L^2 token forwards per fallback example of context length L)
    n2g_max_suffix: int | None = 12
    # int: tokens of each explaining block (BOS included) the examples come from
    n2g_context_length: int = 64
    seed: int = 0
    # bool: raise the first eval error instead of recording it in the report
    strict: bool = False

    def __post_init__(self):
        unknown = set(self.evals) - set(EVALS)
        if unknown:
            raise ValueError(f"evals: unknown {sorted(unknown)}; choose from {list(EVALS)}")


@dataclass
class EvalData:
    """What the evals read. ``model``/``tokenizer``/``tokens`` are None when only activations are
    available (e.g. the synthetic data module): the LM evals are then skipped with a note."""

    hookpoint: str | None
    val_acts: Tensor  # [N, d] held-out raw activations, BOS excluded
    train_acts: Tensor | None = None  # [M, d] for the JumpReLU calibration
    tokens: Tensor | None = None  # [B, T] held-out blocks, BOS first
    block_acts: Tensor | None = None  # [B, T, d] their cached activations
    model: Any = None
    tokenizer: Any = None
    bos_id: int | None = None
    sep_id: int | None = None
    outlier_threshold: float | None = None  # activation norm above which training skipped a token
    val_blocks: Tensor | None = None  # [N] the block each row of val_acts comes from (bootstrap clusters)
    info: dict = field(default_factory=dict)

    @property
    def has_lm(self) -> bool:
        return self.model is not None and self.tokens is not None


_MODELS: dict[tuple, tuple] = {}


def load_subject(spec: str, device: str | torch.device = "cpu", dtype: str = "auto"):
    """(model, tokenizer), loaded once per process: validation runs every few hundred steps and
    the embedded model takes ~20 s to de-quantize."""
    key = (spec, str(device), dtype)
    if key not in _MODELS:
        _MODELS[key] = (load_model(spec, device, dtype), load_tokenizer(spec))
    return _MODELS[key]


def data_from_datamodule(dm, cfg: EvalConfig, device: str | torch.device = "cpu") -> EvalData:
    """EvalData from an ActivationDataModule (blocks + subject LM), or from any data module with
    a val_dataloader of activation batches (activation-only evals)."""
    start, cpu = time.perf_counter(), time.process_time()
    if isinstance(dm, CachedActivations):
        manifest = dm.ensure_manifest()
        T = int(dm.cache_config.context_length)
        n_blocks = max(cfg.downstream_contexts, cfg.ablation_contexts, cfg.n2g_blocks,
                       math.ceil(cfg.activation_tokens / max(T - 1, 1)))
        toks, acts = [], []
        for t, a in dm.iter_blocks("val"):
            toks.append(t)
            acts.append(a)
            if len(toks) >= n_blocks:
                break
        tokens, block_acts = torch.stack(toks), torch.stack(acts)
        threshold = manifest.get("outlier_threshold") if cfg.exclude_outliers and dm.exclude_outliers else None
        val_acts = block_acts[:, 1:].reshape(-1, block_acts.shape[-1])
        val_blocks = torch.arange(block_acts.shape[0]).repeat_interleave(block_acts.shape[1] - 1)
        if threshold is not None:
            keep = val_acts.norm(dim=-1) <= threshold
            val_acts, val_blocks = val_acts[keep], val_blocks[keep]
        need_lm = bool(LM_EVALS & set(cfg.evals))
        model, tokenizer = load_subject(dm.cache_config.model, device) if need_lm else (None, None)
        train = dm.init_sample(cfg.calibration_tokens) if "progressive" in cfg.evals else None
        return EvalData(
            hookpoint=dm.cache_config.hookpoint,
            val_acts=val_acts[: cfg.activation_tokens], val_blocks=val_blocks[: cfg.activation_tokens],
            train_acts=train, tokens=tokens, block_acts=block_acts, model=model, tokenizer=tokenizer,
            bos_id=manifest.get("bos_token_id"), sep_id=manifest.get("separator_token_id"), outlier_threshold=threshold,
            info={"cache_dir": str(dm.cache_config.cache_dir), "model": dm.cache_config.model,
                  "hook_name": manifest.get("hook_name"), "context_length": T, "val_blocks": len(toks),
                  "outlier_threshold": threshold, "seconds": round(time.perf_counter() - start, 2),
                  "cpu_seconds": round(time.process_time() - cpu, 2)},
        )
    if not isinstance(dm, L.LightningDataModule):
        raise TypeError(f"{type(dm).__name__} is neither a CachedActivations source (ActivationDataModule) nor a "
                        "LightningDataModule with a val_dataloader")
    xs, n = [], 0
    for batch in dm.val_dataloader():
        x = acts_of(batch)
        xs.append(x.float().cpu())
        n += x.shape[0]
        if n >= cfg.activation_tokens:
            break
    train = dm.init_sample(cfg.calibration_tokens) if isinstance(dm, ActivationSource) else None
    return EvalData(hookpoint=None, val_acts=torch.cat(xs)[: cfg.activation_tokens], train_acts=train,
                    info={"data": type(dm).__name__, "note": "activations only: LM evals skipped"})


def _shrinkage(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    return shrinkage(sae, data.val_acts[: cfg.shrinkage_tokens], max_iter=cfg.shrinkage_max_iter,
                     clusters=data.val_blocks, seed=cfg.seed)


def _progressive(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    return progressive_recovery(sae, data.val_acts, data.train_acts, clusters=data.val_blocks, seed=cfg.seed)


def _downstream(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    return downstream_loss(sae, data.model, data.hookpoint, data.tokens[: cfg.downstream_contexts],
                           batch_size=cfg.lm_batch_size, exclude_bos=cfg.exclude_bos,
                           outlier_threshold=data.outlier_threshold)


def _probes(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    snippets = builtin_snippets(data.tokenizer, cfg.probe_code_snippets, cfg.probe_pydoc_snippets,
                                cfg.probe_kjv_snippets_per_genre, cfg.probe_snippet_tokens, cfg.seed)
    for path in cfg.probe_tasks_jsonl:
        snippets += load_jsonl_task(path)[1]
    r = probe_eval(sae, data.model, data.tokenizer, data.hookpoint, snippets, cfg.probe_max_per_class,
                   batch_size=2 * cfg.lm_batch_size, seed=cfg.seed)
    r.details["vader"] = "used" if vader_lexicon() is not None else "vaderSentiment not installed: vader_* tasks skipped"
    return r


def _ablation(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    ctx = data.tokens[: cfg.ablation_contexts, : cfg.ablation_context_length]
    return ablation_sparsity(sae, data.model, data.hookpoint, ctx, cfg.ablation_positions_per_context,
                             cfg.ablation_latents_per_position, window=cfg.ablation_window, exclude_bos=cfg.exclude_bos,
                             outlier_threshold=data.outlier_threshold, seed=cfg.seed)


def _n2g(sae, data: EvalData, cfg: EvalConfig) -> EvalResult:
    B = min(cfg.n2g_blocks, data.tokens.shape[0])
    if data.tokenizer is None:
        raise ValueError("n2g needs the subject's tokenizer to pick its filler token")
    return n2g_eval(sae, data.model, data.hookpoint, data.tokens[:B], data.block_acts[:B], data.bos_id,
                    filler_token(data.tokenizer), cfg.n2g_latents, cfg.n2g_top_examples, cfg.n2g_random_examples,
                    cfg.n2g_max_suffix, cfg.n2g_context_length, tokenizer=data.tokenizer, seed=cfg.seed)


# name -> runner(sae adapter, data, config); run in this order.
RUNNERS: dict[str, Callable[[SAEAdapter, EvalData, EvalConfig], EvalResult]] = {
    "downstream": _downstream, "shrinkage": _shrinkage, "progressive": _progressive,
    "probes": _probes, "ablation": _ablation, "n2g": _n2g,
}
assert tuple(RUNNERS) == EVALS


def run_suite(sae, data: EvalData, cfg: EvalConfig | None = None) -> tuple[dict, dict]:
    """Run the enabled evals in order; returns (report, figures). An eval that fails is recorded
    under report["errors"] (unless cfg.strict) so one problem does not lose the others' results."""
    cfg = cfg or EvalConfig()
    sae = as_adapter(sae)
    report: dict = {"metrics": {}, "details": {}, "seconds": {}, "cpu_seconds": {}, "errors": {}, "skipped": {}, "versions": {},
                    "config": dataclasses.asdict(cfg), "data": data.info}
    figures: dict = {}
    suite_start = time.perf_counter()
    # One step per eval, named while it runs (each takes seconds to minutes).
    bar = tqdm([name for name in EVALS if name in cfg.evals], desc="evaluating", unit="eval", leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        if name in LM_EVALS and not data.has_lm:
            report["skipped"][name] = "no subject LM / token blocks (activation-only data)"
            continue
        start, cpu = time.perf_counter(), time.process_time()
        try:
            r = RUNNERS[name](sae, data, cfg)
        except Exception as e:  # noqa: BLE001 - recorded, see docstring
            if cfg.strict:
                raise
            log.exception("eval %s failed", name)
            report["errors"][name] = f"{type(e).__name__}: {e}"
            continue
        report["seconds"][name] = round(time.perf_counter() - start, 2)
        # CPU seconds of all threads: on a shared machine wall time says little, this does not change
        report["cpu_seconds"][name] = round(time.process_time() - cpu, 2)
        report["versions"][name] = EVAL_VERSIONS[name]
        report["metrics"].update(r.metrics)
        report["details"][name] = r.details
        figures.update(r.figures)
        log.info("eval %s: %s (%.1f s)", name, ", ".join(f"{k}={v:.4g}" for k, v in r.metrics.items()),
                 report["seconds"][name])
    report["suite_seconds"] = round(time.perf_counter() - suite_start, 2)
    return report, figures
