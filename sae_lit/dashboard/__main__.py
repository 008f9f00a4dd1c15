"""python -m sae_lit.dashboard --sae DIR --cache DIR --out DIR [--eval_report FILE] [--config FILE]"""
from __future__ import annotations

import sys
from typing import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from sae_lit.dashboard.build import build_dashboard


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sae_lit.dashboard", description=build_dashboard.__doc__.split("\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    p.add_function_arguments(build_dashboard)
    return p


def _underscores(arg: str) -> str:
    """--eval-report as well as jsonargparse's --eval_report."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [_underscores(a) for a in argv]
    cfg = parser().parse_args(argv)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k != "config" and not k.startswith("__")}
    return build_dashboard(**kwargs)


if __name__ == "__main__":
    main()
