"""What may change when a run resumes from a checkpoint, and the error when something else does.

A checkpoint fixes the SAE (its architecture, sizes, init) and the state that goes with it
(EMA, optimizer betas/eps). A different value for one of those on resume would either fail
deep inside load_state_dict or, worse, be silently replaced by the checkpoint's (LightningCLI
parses the checkpoint's hyperparameters over the command line). So a difference is an error
naming each key; the training-schedule keys below are safe to change and are applied.
"""
from __future__ import annotations

import json

# Keys a resumed run may change. lr is applied to the restored optimizer and scheduler state
# (SAEModule.on_load_checkpoint); the others are read afresh at every step.
SAFE_ON_RESUME = frozenset({
    "lr", "warmup_steps", "lr_decay", "decay_start", "auxk_alpha", "l1_coeff", "dead_tokens",
    "histogram_every_n_steps", "init_sample_size", "dead_adam_reset",
})
# Bookkeeping LightningCLI stores with the hyperparameters; not arguments.
# defer_init only says when the SAE is built (the state dict fills it either way).
_IGNORED = frozenset({"_instantiator", "_class_path", "defer_init"})


class ResumeMismatchError(ValueError):
    pass


def flatten(d: dict, prefix: str = "") -> dict:
    """{"sae": {"k": 32}, "lr": 1e-3} -> {"sae.k": 32, "lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        if k in _IGNORED:
            continue
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(v):
    return json.loads(json.dumps(v, default=str))  # tuples -> lists, as a checkpoint stores them


def changes(saved: dict, current: dict, keys=None) -> dict[str, tuple]:
    """{flat key: (checkpoint's value, current value)} where they differ (over `keys` if given)."""
    saved, current = flatten(saved), flatten(current)
    keys = set(saved) | set(current) if keys is None else keys
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if _plain(saved.get(k)) != _plain(current.get(k))}


def split_changes(diff: dict) -> tuple[dict, dict]:
    """(safe, unsafe) parts of a `changes` result."""
    safe = {k: v for k, v in diff.items() if k in SAFE_ON_RESUME}
    return safe, {k: v for k, v in diff.items() if k not in SAFE_ON_RESUME}


def mismatch_message(unsafe: dict, ckpt: str | None = None, prefix: str = "") -> str:
    where = f"checkpoint {ckpt}" if ckpt else "the checkpoint"
    listed = "; ".join(f"{prefix}{k}: {where} has {old!r}, this run asks for {new!r}" for k, (old, new) in unsafe.items())
    return (
        f"Resuming with model arguments that differ from the checkpoint's: {listed}. These fix the SAE the "
        f"checkpoint holds: resume with the checkpoint's values (drop the flags / config keys), or start a new "
        f"run without ckpt_path. Only {', '.join(sorted(SAFE_ON_RESUME))} may change on resume."
    )
