"""The ``sae-lit`` command (also ``python -m sae_lit``): one entry point to every stage.

    sae-lit fit|validate|test --config configs/quickstart.yaml [...]   train / check (LightningCLI, as main.py)
    sae-lit cache --config configs/quickstart.yaml                     build an activation cache
    sae-lit export CKPT OUT_DIR [--format saelens|sparsify]            a checkpoint's SAE as a folder
    sae-lit evaluate --sae SOURCE --config CFG                         the eval suite on any SAE
    sae-lit dashboard --sae SOURCE --cache DIR --out DIR               the latent dashboard
    sae-lit sweep --config configs/sweeps/cpu.yaml                     a sweep of runs
    sae-lit report --sweep configs/sweeps/cpu.yaml                     the reproduction report

``sae-lit COMMAND --help`` shows a command's options. SOURCE is any SAE sae_lit reads: our export,
SAELens, sparsify, an OpenAI .pt, dictionary_learning, or hf://owner/repo[/subfolder].
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module, function taking argv). Imported only when chosen: each pulls in its own
# heavy dependencies (Lightning, transformers, the evals), and `--help` should not wait for all.
COMMANDS = {
    "cache": ("sae_lit.data.cache", "main"),
    "export": ("sae_lit.training.export", "main"),
    "evaluate": ("sae_lit.evals.evaluate", "main"),
    "dashboard": ("sae_lit.dashboard.__main__", "main"),
    "sweep": ("sae_lit.analysis.sweep", "main"),
    "report": ("sae_lit.analysis.report", "main"),
}
LIGHTNING = ("fit", "validate", "test")


def usage() -> str:
    return __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2]


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: sae-lit COMMAND [options]\n\n" + usage())
        return None
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING:
        from sae_lit.training.cli import cli_main

        return cli_main([command, *rest])
    if command not in COMMANDS:
        sys.exit(f"sae-lit: unknown command {command!r}; one of {', '.join([*LIGHTNING, *COMMANDS])}")
    module, function = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    main()
