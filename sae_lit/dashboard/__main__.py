"""python -m sae_lit.dashboard --sae DIR --cache DIR --out DIR [--eval-report FILE] [--config FILE]"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from sae_lit.common import one_line_errors, run_cli
from sae_lit.dashboard.build import DashboardConfig, build_dashboard


def parser() -> ArgumentParser:
    p = one_line_errors(ArgumentParser)(prog="python -m sae_lit.dashboard", description=build_dashboard.__doc__.split("\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    p.add_class_arguments(DashboardConfig, as_group=False)
    return p


def _underscores(arg: str) -> str:
    """--eval-report as well as jsonargparse's --eval_report."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args([_underscores(a) for a in argv]).as_dict()
    return build_dashboard(DashboardConfig(**{f.name: args[f.name] for f in dataclasses.fields(DashboardConfig)}))


if __name__ == "__main__":
    run_cli(main)
