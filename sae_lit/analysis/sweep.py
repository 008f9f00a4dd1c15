"""Sweeps: many ordinary Lightning runs over a grid, sharing one activation cache, collected
into one table.

    python -m sae_lit.analysis.sweep --config configs/sweeps/cpu.yaml            # run (resumes)
    python -m sae_lit.analysis.sweep --config configs/sweeps/cpu.yaml --dry-run  # list the runs
    python -m sae_lit.analysis.sweep --config configs/sweeps/cpu.yaml --collect  # only rebuild the tables

A sweep file names a base LightningCLI config and groups of runs:

    root: logs/sweeps/cpu                 # every run is <root>/runs/<name>, a normal log dir
    base_config: configs/quickstart.yaml  # trainer / model / data for every run
    common: {trainer.max_steps: 300}      # CLI overrides for every run
    defaults: {model.sae.num_latents: 4096, model.sae.k: 32, model.sae.activation: topk}
    lr_at_16k: 7.0e-4                     # lr_mult runs: lr = lr_mult * lr_at_16k * sqrt(2^14 / n)
    eval: {downstream_contexts: 16}       # EvalConfig budgets shared by all runs
    groups:
      nk:                                 # one name per paper claim it serves
        evals: [downstream]
        grid: {model.sae.num_latents: [1024, 4096], model.sae.k: [16, 32]}
      baselines:
        runs: [{model.sae.activation: relu, model.l1_coeff: 0.003}]

A group's runs are its ``runs`` (default: one empty run) crossed with its ``grid``. A run is
identified by its settings merged over ``defaults``: the same settings in two groups train
once and count for both. Finished runs (``result.json`` present) are skipped, so an
interrupted sweep resumes where it stopped. Results: ``<root>/results.csv`` (one row per
run, every metric) and ``<root>/curves.csv`` (validation NMSE during training).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ActionYesNo, ArgumentParser

from sae_lit.common import atomic_path, one_line_errors, run_cli, write_json_atomic
from sae_lit.evals.suite import EVAL_VERSIONS

log = logging.getLogger(__name__)

NAME_KEYS = ("model.sae.activation", "model.sae.num_latents", "model.sae.k")
SHORT = {"model.sae.activation": "", "model.sae.num_latents": "n", "model.sae.k": "k", "model.lr": "lr", "lr_mult": "lrx",
         "model.l1_coeff": "l1", "model.sae.multi_topk": "multi", "model.sae.tied_init": "tied", "model.auxk_alpha": "auxk",
         "model.sae.b_dec_init": "bdec", "trainer.max_steps": "steps", "model.dead_tokens": "dead", "seed": "seed"}
SWEEP_KEYS = {"lr_mult", "seed"}  # settings the sweep interprets itself (not passed to the CLI)


@dataclasses.dataclass
class Run:
    name: str
    settings: dict  # merged over the sweep's defaults
    groups: list[str]
    evals: list[str]


def read_sweep(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such sweep file")
    spec = yaml.safe_load(p.read_text()) or {}
    for key in ("root", "base_config", "groups"):
        if key not in spec:
            raise KeyError(f"{path}: sweep file needs a `{key}:` entry")
    if not isinstance(spec["groups"], dict) or not spec["groups"]:
        raise ValueError(f"{path}: `groups:` must map group names to {{runs, grid, evals}}")
    spec["_path"] = str(p)
    return spec


def _slug(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("/", "_").replace(" ", "")


def run_name(settings: dict, defaults: dict) -> str:
    parts = []
    for key in sorted(settings, key=lambda k: (k not in NAME_KEYS, NAME_KEYS.index(k) if k in NAME_KEYS else 0, k)):
        if key in NAME_KEYS or settings[key] != defaults.get(key):
            short = SHORT.get(key, key.rsplit(".", 1)[-1])
            parts.append(f"{short}{_slug(settings[key])}")
    return "-".join(parts) or "default"


def expand(spec: dict) -> list[Run]:
    """Every distinct run of the sweep, in group order, with the groups it belongs to."""
    defaults = dict(spec.get("defaults") or {})
    runs: dict[str, Run] = {}
    for group, g in spec["groups"].items():
        g = g or {}
        grid = g.get("grid") or {}
        keys = list(grid)
        for base in g.get("runs") or [{}]:
            for values in itertools.product(*(grid[k] for k in keys)):
                settings = {**defaults, **base, **dict(zip(keys, values))}
                name = run_name(settings, defaults)
                if name in runs:
                    r = runs[name]
                    if r.settings != settings:
                        raise ValueError(f"runs named {name!r} differ: {r.settings} vs {settings}")
                    r.groups.append(group)
                    r.evals = sorted(set(r.evals) | set(g.get("evals") or []))
                else:
                    runs[name] = Run(name, settings, [group], sorted(g.get("evals") or []))
    return list(runs.values())


def cli_overrides(run: Run, spec: dict) -> dict:
    """The CLI overrides of a run: common ones, then its settings; lr_mult becomes model.lr."""
    over = {**(spec.get("common") or {}), **{k: v for k, v in run.settings.items() if k not in SWEEP_KEYS}}
    if "lr_mult" in run.settings:
        n = int(over["model.sae.num_latents"])
        over["model.lr"] = float(run.settings["lr_mult"]) * float(spec["lr_at_16k"]) * math.sqrt(2**14 / n)
    if "seed" in run.settings:
        # A replicate: another SAE init and another training stream (seed_everything alone
        # reaches neither: both take their own seeds).
        seed = int(run.settings["seed"])
        over.update({"seed_everything": seed, "model.sae.seed": seed, "data.init_args.seed": seed})
    return over


# ------------------------------------------------------------------------------ one run
def train_run(run: Run, spec: dict, run_dir: Path) -> tuple[dict, list[dict]]:
    """Fit one run through the normal CLI, then validate on the whole split."""
    import lightning as L

    from sae_lit.training.cli import cli_main

    over = cli_overrides(run, spec)
    args = ["--config", str(spec["base_config"]), f"--trainer.default_root_dir={run_dir}"]
    args += [f"--{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}" for k, v in over.items()]
    cli = cli_main(args, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_seconds = time.perf_counter() - start
    # The whole validation split, whatever limit_val_batches training used for its curve.
    full = L.Trainer(accelerator=trainer.accelerator, devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=1.0, enable_checkpointing=False)
    final = full.validate(model, datamodule=dm, verbose=False)[0]
    hp, sae = model.hparams, model.sae.cfg
    batch = int(getattr(dm, "batch_size", 0) or 0)
    tokens = int(model.tokens_seen)
    dead_train = float((model.tokens_since_fired >= hp.dead_tokens).float().mean())
    row = {
        "run": run.name, "groups": ";".join(run.groups), "log_dir": trainer.log_dir,
        "activation": sae.activation, "num_latents": sae.num_latents, "k": sae.k, "d_in": sae.d_in,
        "lr": model.lr, "l1_coeff": hp.l1_coeff, "multi_topk": sae.multi_topk, "tied_init": sae.tied_init,
        "auxk_alpha": hp.auxk_alpha, "b_dec_init": sae.b_dec_init, "dead_tokens": hp.dead_tokens,
        "k_aux": model.sae.k_aux, "dead_adam_reset": hp.get("dead_adam_reset", False),
        "steps": trainer.global_step, "batch_size": batch, "tokens": tokens,
        "flops": 6.0 * sae.d_in * sae.num_latents * tokens, "train_seconds": round(train_seconds, 1),
        "train/dead_frac_end": dead_train, "seed": int(run.settings.get("seed", 0)),
        **{k: float(v) for k, v in final.items()},
    }
    return row, curve_from_events(trainer.log_dir, run.name, batch)


TRAIN_CURVE_TAGS = ("train/dead_frac", "train/dead_margin_median", "train/dead_margin_max")


def train_curves_from_events(log_dir: str, run: str, batch_size: int) -> list[dict]:
    """The training-time dead-latent curves of a run: the dead fraction and where AuxK's dead
    latents stand against the firing threshold (sae_lit.training.module logs them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    have = set(ev.Tags().get("scalars", []))
    by_step: dict[int, dict] = {}
    for tag in TRAIN_CURVE_TAGS:
        if tag in have:
            for e in ev.Scalars(tag):
                row = by_step.setdefault(e.step, {"run": run, "step": e.step + 1, "tokens": (e.step + 1) * batch_size})
                row[tag] = e.value
    return [by_step[s] for s in sorted(by_step)]


def curve_from_events(log_dir: str, run: str, batch_size: int) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    if "val/nmse" not in ev.Tags().get("scalars", []):
        return []
    # Lightning logs a validation at the index of the last training step it follows.
    return [{"run": run, "step": e.step + 1, "tokens": (e.step + 1) * batch_size, "val/nmse": e.value}
            for e in ev.Scalars("val/nmse")]


class EvalRunner:
    """Evaluates finished runs with one shared EvalData (the subject LM is loaded once)."""

    def __init__(self, spec: dict, runs: list[Run]):
        self.spec = spec
        self.evals = sorted({e for r in runs for e in r.evals})
        self.data = None

    def _config(self, evals: list[str]):
        from sae_lit.evals.suite import EvalConfig

        return EvalConfig(**{**(self.spec.get("eval") or {}), "evals": list(evals)})

    def __call__(self, run: Run, sae_dir: Path, out_dir: Path, merge: bool = False) -> dict:
        if not run.evals:
            return {}
        from sae_lit.evals.report import close_figures, write_report
        from sae_lit.evals.suite import data_from_datamodule, run_suite
        from sae_lit.evals.evaluate import datamodule_from_config, read_yaml_config
        from sae_lit.model.formats import load_sae

        if self.data is None:
            cfg_path = str(self.spec["base_config"])
            config = read_yaml_config(cfg_path)
            # The runs' data: the base config with the sweep's common data.* overrides.
            for key, value in (self.spec.get("common") or {}).items():
                if key.startswith("data."):
                    *path, last = key.split(".")[1:]
                    node = config.setdefault("data", {})
                    for part in path:
                        node = node.setdefault(part, {})
                    node[last] = value
            dm = datamodule_from_config(config, cfg_path)
            dm.prepare_data()
            dm.setup("test")
            self.data = data_from_datamodule(dm, self._config(self.evals))
        sae = load_sae(sae_dir)
        with torch.no_grad():
            report, figures = run_suite(sae, self.data, self._config(run.evals))
        write_report(report, figures, out_dir, merge=merge)
        close_figures(figures)
        for name, err in report["errors"].items():
            log.warning("run %s: eval %s failed: %s", run.name, name, err)
        return dict(report["metrics"])


# ------------------------------------------------------------------------------ the sweep
def run_sweep(spec: dict, only: list[str] | None = None) -> list[dict]:
    root = Path(spec["root"])
    runs = expand(spec)
    if only:
        runs = [r for r in runs if r.name in only or set(r.groups) & set(only)]
    evaluator = EvalRunner(spec, runs)
    for i, run in enumerate(runs):
        run_dir = root / "runs" / run.name
        done = run_dir / "result.json"
        if done.exists():
            res = json.loads(done.read_text())
            row = res["row"]
            have = evals_done(row)
            missing = [e for e in run.evals if e not in have]
            if not missing:
                log.info("[%d/%d] %s: done, skipped", i + 1, len(runs), run.name)
                continue
            # A finished run that a group now also wants evaluated: run only the missing evals.
            log.info("[%d/%d] %s: trained; evaluating %s", i + 1, len(runs), run.name, ", ".join(missing))
            log_dir = Path(row["log_dir"])
            row.update(evaluator(dataclasses.replace(run, evals=missing), log_dir / "sae", log_dir / "eval", merge=True))
            row["evals"] = evals_field(have | set(missing))
            _write_result(done, row, res["curve"])
            continue
        log.info("[%d/%d] %s (%s)", i + 1, len(runs), run.name, ", ".join(run.groups))
        start = time.perf_counter()
        row, curve = train_run(run, spec, run_dir)
        sae_dir = Path(row["log_dir"]) / "sae"
        row.update(evaluator(run, sae_dir, Path(row["log_dir"]) / "eval"))
        row["evals"] = evals_field(run.evals)
        row["wall_seconds"] = round(time.perf_counter() - start, 1)
        row["settings"] = json.dumps(run.settings, sort_keys=True)
        _write_result(done, row, curve)
        log.info("  %s: val/nmse=%.4f l0=%.1f dead=%.3f, %.0f s", run.name, row.get("val/nmse", float("nan")),
                 row.get("val/l0", float("nan")), row.get("val/dead_frac", float("nan")), row["wall_seconds"])
    return write_tables(spec)


def _write_result(path: Path, row: dict, curve: list[dict]) -> None:
    write_json_atomic(path, {"row": row, "curve": curve}, indent=1)  # a killed run leaves no result and is redone


def evals_done(row: dict) -> set[str]:
    """The evals a finished run has had at their current version (``EVAL_VERSIONS``): its
    ``evals`` field ("name@version"; a bare name is version 1), or (older results) those its
    eval report records as run, skipped or failed. An eval whose definition changed since is
    not done: the sweep measures it again."""
    if row.get("evals") is not None:
        names = list(filter(None, str(row["evals"]).split(";")))
    else:
        path = Path(str(row.get("log_dir", ""))) / "eval" / "report.json"
        if not path.is_file():
            return set()
        report = json.loads(path.read_text())
        versions = report.get("versions", {})
        names = [f"{n}@{versions.get(n, 1)}" for n in
                 set(report.get("seconds", {})) | set(report.get("skipped", {})) | set(report.get("errors", {}))]
    done = set()
    for entry in names:
        name, _, version = entry.partition("@")
        if int(version or 1) == EVAL_VERSIONS.get(name, 1):
            done.add(name)
    return done


def evals_field(names) -> str:
    """The ``evals`` column: each eval with the version it was measured at."""
    return ";".join(f"{n}@{EVAL_VERSIONS.get(n, 1)}" for n in sorted(names))


def write_tables(spec: dict) -> list[dict]:
    """(Re)write results.csv and curves.csv from every finished run's result.json."""
    root = Path(spec["root"])
    rows, curves, train_curves = [], [], []
    by_name = {r.name: r for r in expand(spec)}
    for path in sorted((root / "runs").glob("*/result.json")):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable result ({e}); delete it to rerun that run") from None
        row = res["row"]
        if row["run"] not in by_name:
            log.info("%s: not in the sweep file any more, left out of the tables", path.parent.name)
            continue
        row["groups"] = ";".join(by_name[row["run"]].groups)  # as the sweep file says now
        rows.append(row)
        log_dir = row.get("log_dir")
        # Rebuilt from the run's own TensorBoard events when they are there (they are the record).
        if log_dir and Path(log_dir).is_dir():
            curves += curve_from_events(log_dir, row["run"], int(row["batch_size"]))
            train_curves += train_curves_from_events(log_dir, row["run"], int(row["batch_size"]))
        else:
            curves += res["curve"]
    if not rows:
        return rows
    cols = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(root / "results.csv", rows, cols)
    write_csv(root / "curves.csv", curves, ["run", "step", "tokens", "val/nmse"])
    write_csv(root / "train_curves.csv", train_curves, ["run", "step", "tokens", *TRAIN_CURVE_TAGS])
    return rows


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_table(path: str | Path) -> list[dict]:
    """A results/curves CSV with numbers parsed (empty cells -> None)."""
    out = []
    with Path(path).open() as f:
        for row in csv.DictReader(f):
            out.append({k: _num(v) for k, v in row.items()})
    return out


def _num(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def command(config: str, root: str | None = None, only: list[str] | None = None, dry_run: bool = False,
            collect: bool = False) -> list[dict]:
    """Run a sweep (finished runs are skipped), list its runs, or only rebuild its tables.

    Args:
        config: sweep YAML (see configs/sweeps/).
        root: override the sweep's root folder.
        only: run only these run or group names.
        dry_run: list the runs and exit.
        collect: only rebuild results.csv / curves.csv.

    Returns the finished runs' rows (none for a dry run).
    """
    spec = read_sweep(config)
    if root:
        spec["root"] = root
    if dry_run:
        runs = expand(spec)
        for r in runs:
            print(f"{r.name:<48} groups={','.join(r.groups)} evals={','.join(r.evals) or '-'}")
        print(f"{len(runs)} runs")
        return []
    rows = write_tables(spec) if collect else run_sweep(spec, only)
    print(f"{len(rows)} finished runs -> {Path(spec['root']) / 'results.csv'}")
    return rows


def parser() -> ArgumentParser:
    p = one_line_errors(ArgumentParser)(prog="python -m sae_lit.analysis.sweep", description=__doc__.split("\n\n")[0])
    p.add_function_arguments(command, skip={"only", "dry_run", "collect"}, as_group=False)
    # Spelled as they always were: `--only A B`, and bare flags (a bool parameter would want
    # `--dry_run true`). `--config` is the sweep file, not a config file of this command.
    p.add_argument("--only", nargs="*", type=str, help="run only these run or group names")
    p.add_argument("--dry-run", "--dry_run", action=ActionYesNo(no_prefix=None), default=False,
                   help="list the runs and exit")
    p.add_argument("--collect", action=ActionYesNo(no_prefix=None), default=False,
                   help="only rebuild results.csv / curves.csv")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return command(**args.as_dict())


if __name__ == "__main__":
    run_cli(main)
