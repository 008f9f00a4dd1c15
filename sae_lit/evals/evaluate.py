"""Evaluate any SAE with the full suite: ours, SAELens (v6 or older), sparsify, OpenAI,
dictionary_learning, local or on the hub (see sae_lit.model.formats).

    python -m sae_lit.evals --sae logs/quickstart/lightning_logs/version_0/sae --config configs/quickstart.yaml
    python -m sae_lit.evals --sae DIR --config CFG --evals.evals '[downstream, probes]' --evals.n2g_latents 16
    python -m sae_lit.evals --sae hf://EleutherAI/sae-llama-3-8b-32x --subfolder layers.10 --config CFG

The config's `data:` section (a LightningCLI config, or flat data-module keys) names the subject
model, the hookpoint and the activation cache (built if missing); an EvalSuite callback in its
`trainer.callbacks`, if any, supplies the eval budgets, which `--evals.*` flags override.
Writes `<out>/report.json`, figures and TensorBoard events; `<out>` defaults to the `eval/`
folder next to the SAE folder (`<log_dir>/eval` for an SAE exported at the end of fit), `eval_<name>/`
next to an SAE file, and `evals/<repo>[/<subfolder>]` for a hub source. The SAE's own metadata
(model, hookpoint) is checked against the data: another width is an error, another hookpoint or
model a warning.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from jsonargparse import ArgumentParser

from sae_lit.data.source import CachedActivations
from sae_lit.data.subject import published_sae_hook, resolve_device
from sae_lit.evals.compat import check_sae_matches_data
from sae_lit.evals.report import close_figures, log_tensorboard, write_report
from sae_lit.evals.suite import EvalConfig, data_from_datamodule, run_suite
from sae_lit.model.formats import load_sae
from sae_lit.model.formats.hub import split_hub

DEFAULT_DATA = "sae_lit.data.datamodule.ActivationDataModule"


def read_yaml_config(path: str) -> dict:
    """A training config file (LightningCLI YAML) as a dict; names the file when it is missing or
    not a mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    cfg = yaml.safe_load(p.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return cfg


def datamodule_from_config(cfg: dict, path: str = "config"):
    """Instantiate the config's data module (`data: {class_path, init_args}` or flat keys)."""
    section = cfg.get("data")
    if not isinstance(section, dict):
        raise KeyError(f"{path}: no `data:` section; it names the model, hookpoint and cache to evaluate on")
    class_path = section.get("class_path", DEFAULT_DATA)
    init_args = section.get("init_args", {} if "class_path" in section else section)
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"{path}: data.class_path {class_path!r} cannot be imported ({e})") from None
    init_args = {k: v for k, v in init_args.items() if k != "progress"}
    return cls(**init_args)


def eval_defaults_from_config(cfg: dict) -> dict:
    """init_args.config of the first EvalSuite-like callback in trainer.callbacks, if any."""
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).startswith("sae_lit.training.callbacks"):
            conf = (cb.get("init_args") or {}).get("config") or {}
            return {k: v for k, v in conf.items() if k in {f.name for f in dataclasses.fields(EvalConfig)}}
    return {}


def default_out_dir(source, subfolder: str | None = None) -> Path:
    """Where a source's report goes when --out is not given."""
    hub = split_hub(str(source), subfolder)
    if hub is not None:
        return Path("evals") / hub[0].replace("/", "--") / (hub[1] or "")
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.is_file():
        return path.parent / f"eval_{path.stem}"
    return path.parent / "eval" if path.name == "sae" else path / "eval"


def evaluate(sae, config_path: str, out_dir: str | None = None, device: str = "auto",
             eval_cfg: EvalConfig | None = None, subfolder: str | None = None, revision: str | None = None,
             norm_scaling_factor: float | None = None) -> dict:
    """The suite on ``sae``: any source load_sae reads (a folder, file or hub repository) or a
    live SAE object (a TopKSAE, SAELens SAE or sparsify SparseCoder; then give ``out_dir``)."""
    start = time.perf_counter()
    cfg = read_yaml_config(config_path)
    eval_cfg = eval_cfg or EvalConfig(**eval_defaults_from_config(cfg))
    dev = resolve_device(device)
    live = not isinstance(sae, (str, Path))
    if live and out_dir is None:
        raise ValueError("evaluate: give out_dir for an SAE object (there is no folder to put the report next to)")
    name = f"the SAE {type(sae).__name__ if live else sae}" + (f" ({subfolder})" if subfolder else "")
    model = load_sae(sae, device=dev, subfolder=subfolder, revision=revision, norm_scaling_factor=norm_scaling_factor)
    dm = datamodule_from_config(cfg, config_path)
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    if hasattr(dm, "setup"):
        dm.setup("test")
    manifest = getattr(dm, "manifest", None) or {}
    metadata = (getattr(model, "export_cfg", None) or {}).get("metadata") or {}
    sae_hook = published_sae_hook(metadata, dm.cache_config.model, name) if isinstance(dm, CachedActivations) else None
    check_sae_matches_data(model.d_in, sae_hook, getattr(dm, "d_in", None), manifest.get("hook_name"),
                           sae_name=name, data_name=f"the data of {config_path}")
    data = data_from_datamodule(dm, eval_cfg, device=dev)
    report, figures = run_suite(model, data, eval_cfg)
    report.update(stage="evaluate", sae_dir=str(sae) if not live else type(sae).__name__, config_file=str(config_path),
                  data_config=cfg.get("data"), sae=getattr(model, "export_cfg", {}),
                  wall_seconds=round(time.perf_counter() - start, 1))
    out = Path(out_dir) if out_dir else default_out_dir(sae, subfolder)
    path = write_report(report, figures, out, merge=False)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out))
    log_tensorboard(writer, report["metrics"], figures, 0)
    writer.close()
    close_figures(figures)
    report["report_file"] = str(path)
    return report


def summary(report: dict) -> str:
    m = report["metrics"]
    rows = [
        ("delta CE (nats)", "eval/delta_ce", None), ("KL clean||spliced", "eval/kl", None),
        ("CE recovered", "eval/ce_recovered", None), ("probe loss", "eval/probe_loss", "eval/probe_loss_residual"),
        ("N2G precision", "eval/n2g_precision", None), ("N2G recall", "eval/n2g_recall", None),
        ("ablation sparsity", "eval/ablation_sparsity", "eval/ablation_sparsity_residual"),
        ("shrinkage", "eval/shrinkage", None), ("NMSE at k", "eval/progressive_nmse_k", None),
        ("NMSE at 4k", "eval/progressive_nmse_4k", None), ("NMSE JumpReLU", "eval/progressive_nmse_jumprelu", None),
    ]
    lines = [f"{'metric':<22}{'SAE':>10}{'residual':>10}"]
    for label, key, base in rows:
        if key in m:
            b = f"{m[base]:>10.4g}" if base and base in m else f"{'':>10}"
            lines.append(f"{label:<22}{m[key]:>10.4g}{b}")
    for name, err in report.get("errors", {}).items():
        lines.append(f"{name}: FAILED {err}")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: skipped ({why})")
    lines.append(f"seconds: {report.get('seconds')}, wall {report.get('wall_seconds')} s")
    return "\n".join(lines)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sae_lit.evals", description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", required=True, help="the SAE: a folder or file in any format sae_lit reads (ours, SAELens, "
                   "sparsify, OpenAI .pt, dictionary_learning), or hf://owner/repo[/subfolder]")
    p.add_argument("--subfolder", default=None, help="folder inside --sae (e.g. a hub repository's layers.8)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.add_argument("--norm_scaling_factor", type=float, default=None,
                   help="dataset constant of a SAELens expected_average_only_in SAE without activation_scaler.json")
    # A training config, read for its data: section and EvalSuite callback; not a config file of
    # this command (so no ActionConfigFile).
    p.add_argument("--config", required=True, help="training config whose data: section names model, hookpoint, cache")
    p.add_argument("--out", default=None, help="output folder (default: eval/ next to the SAE folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_class_arguments(EvalConfig, "evals", help="eval budgets (default: the --config file's EvalSuite callback, "
                          "else the values shown)")
    return p


def parse(argv: Sequence[str] | None = None):
    """The command line over the --config file's EvalSuite budgets over EvalConfig's defaults.

    Parsed once without defaults, so what the command line sets is known; the callback's
    budgets then fill in the `evals.*` keys it left out (they depend on --config, so they
    cannot be parser defaults up front)."""
    p = parser()
    given = p.parse_args(argv, defaults=False)
    budgets = eval_defaults_from_config(read_yaml_config(given.config))
    p.set_defaults({f"evals.{k}": v for k, v in budgets.items()})
    args = p.get_defaults()
    args.update(given)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    eval_cfg = EvalConfig(**{f.name: args.evals[f.name] for f in dataclasses.fields(EvalConfig)})
    with torch.no_grad():  # scoped: main() is also called in-process (tests, notebooks)
        report = evaluate(args.sae, args.config, args.out, args.device, eval_cfg, subfolder=args.subfolder,
                          revision=args.revision, norm_scaling_factor=args.norm_scaling_factor)
    print(summary(report))
    print(f"Report: {report['report_file']}")
    return report


if __name__ == "__main__":
    main()
