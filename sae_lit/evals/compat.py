"""Does an SAE fit the activations it is about to read? One check for every tool that pairs an
exported SAE with a cache or data module (``python -m sae_lit.evals``, the dashboard)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def hook_name_of(sae) -> str | None:
    """The hookpoint an SAE was exported for (SAELens ``cfg.json`` metadata.hook_name), if it says."""
    return ((getattr(sae, "export_cfg", None) or {}).get("metadata") or {}).get("hook_name")


def check_sae_matches_data(sae_d_in: int, sae_hook_name: str | None, data_d_in: int | None,
                           data_hook_name: str | None, sae_name: str, data_name: str) -> None:
    """Raise ValueError when the widths differ (the SAE cannot read these activations); log a
    warning when both name a hookpoint and the names differ (it can, but they may mean another
    layer). ``None`` for a width or hook name means unknown: not checked."""
    if data_d_in is not None and int(sae_d_in) != int(data_d_in):
        raise ValueError(f"{sae_name} takes d_in={sae_d_in} but {data_name} holds d_in={data_d_in} activations: "
                         "the SAE was trained on another model or hookpoint")
    if sae_hook_name and data_hook_name and sae_hook_name != data_hook_name:
        log.warning("%s was exported for hook %s but %s holds %s activations; going on anyway",
                    sae_name, sae_hook_name, data_name, data_hook_name)
