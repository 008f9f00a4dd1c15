"""saprmarks/dictionary_learning's TopK and BatchTopK SAEs: ``ae.pt`` (a torch.save'd state dict)
next to the training run's ``config.json``.

    encoder.weight [n, d]   encoder.bias [n]   decoder.weight [d, n]   b_dec [d]
    k (int)                 threshold (one value; -1 until estimated)

config.json: {"trainer": {"dict_class", "lm_name", "layer", "submodule_name", ...}, "buffer": {"io", ...}}.

AutoEncoderTopK's forward: TopK(ReLU(encoder(x - b_dec))) (the same as our TopK then ReLU).
BatchTopKSAE's forward (its encode's default, use_threshold=True): z = ReLU(pre) where
ReLU(pre) > threshold, our batchtopk inference; with the threshold never estimated (< 0) that keeps
every positive latent, a plain ReLU SAE, which is what it loads as then.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from sae_lit.model.formats.parts import FormatError, SAEParts, description, expect, load_pickled

log = logging.getLogger(__name__)

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"
DICT_CLASSES = ("AutoEncoderTopK", "BatchTopKSAE")
_SUBMODULE = re.compile(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_?(\d+)$")


def is_state(state: dict) -> bool:
    return all(k in state for k in ("encoder.weight", "decoder.weight", "b_dec", "k"))


def _metadata(trainer: dict, buffer: dict) -> dict:
    meta = {"model_name": trainer.get("lm_name"), "layer": trainer.get("layer"),
            "submodule_name": trainer.get("submodule_name")}
    m = _SUBMODULE.match(str(trainer.get("submodule_name") or ""))
    if m and buffer.get("io", "out") == "out":
        meta["hook_name"] = f"{m.group(1)}.{int(m.group(2))}"
    return meta


def read(path: Path, state: dict | None = None) -> SAEParts:
    """``path``: the ae.pt file (its config.json beside it)."""
    cfg_path = path.parent / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(f"{path}: no {CONFIG_NAME} beside it; dictionary_learning's config tells a TopK from a "
                          "BatchTopK SAE (trainer.dict_class)")
    cfg = json.loads(cfg_path.read_text())
    trainer, buffer = cfg.get("trainer") or {}, cfg.get("buffer") or {}
    dict_class = trainer.get("dict_class")
    if dict_class not in DICT_CLASSES:
        raise FormatError(f"{cfg_path}: trainer.dict_class {dict_class!r} is not supported (one of {list(DICT_CLASSES)})")
    state = dict(state if state is not None else load_pickled(path))
    n, d = state["encoder.weight"].shape
    k = int(state.pop("k"))
    threshold = state.pop("threshold", None)
    w = expect(state, {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "b_dec": (d,)}, path)
    meta = _metadata(trainer, buffer)
    activation, arch, theta = "topk", "topk", None
    if dict_class == "BatchTopKSAE":
        if threshold is None:
            raise FormatError(f"{path}: BatchTopKSAE without its threshold")
        theta = threshold.detach().float().reshape(())
        if float(theta) >= 0:
            activation, arch = "batchtopk", "jumprelu"
        else:
            log.warning("%s: BatchTopKSAE threshold %.3g was never estimated; its forward keeps every positive "
                        "latent (a ReLU SAE), and so does this load", path, float(theta))
            activation, arch, theta = "relu", "standard", None
    return SAEParts(
        W_enc=w["encoder.weight"], b_enc=w["encoder.bias"], W_dec=w["decoder.weight"].t(), b_dec=w["b_dec"],
        activation=activation, k=k, threshold=theta,
        description=description(arch, d, n, "dictionary_learning", path, meta, k=k, dict_class=dict_class),
    )
