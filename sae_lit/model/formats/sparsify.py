"""EleutherAI sparsify's layout: a folder per hookpoint, named after it ("layers.8"), holding

    cfg.json          SparseCoderConfig (activation, k, num_latents or expansion_factor, ...) + d_in
    sae.safetensors   encoder.weight [n, d_in], encoder.bias [n], W_dec [n, d_in], b_dec [d_in]

and, one level up, the training run's config.json (its "model"). The code is
TopK(ReLU(encoder(x - b_dec))), decoded as top_acts @ W_dec + b_dec: the same reconstruction
and active latents as our TopK then ReLU. Transcoders, skip connections, GroupMax and signed
codes compute something else and are refused.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lit.common import atomic_path, write_json_atomic
from sae_lit.model.formats.parts import FormatError, SAEParts, description, expect
from sae_lit.model.sae import TopKSAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
RUN_CONFIG = "config.json"
# cfg.json keys that only matter for training (or that we check below).
_KNOWN = {"activation", "k", "num_latents", "expansion_factor", "d_in", "normalize_decoder", "multi_topk",
          "skip_connection", "transcode", "signed", "sae_lit", "metadata"}


def is_folder(path: Path) -> bool:
    return (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read(folder: Path) -> SAEParts:
    cfg_path, w_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    cfg = json.loads(cfg_path.read_text())
    metadata = dict(cfg.get("metadata") or {})
    metadata.setdefault("hook_name", folder.name)
    run = folder.parent / RUN_CONFIG
    if "model_name" not in metadata and run.is_file():
        metadata["model_name"] = json.loads(run.read_text()).get("model")
    return from_config({**cfg, "metadata": metadata}, load_file(str(w_path)), cfg_path, w_path, folder)


def from_config(cfg: dict, tensors: dict, cfg_path, w_path=None, source=None) -> SAEParts:
    """SAEParts from a sparsify config dict (with d_in) and its tensors."""
    w_path = w_path or cfg_path
    refused = {"transcode": "a transcoder (predicts another module's output)",
               "skip_connection": "a skip connection (W_skip)", "signed": "signed codes"}
    for key, what in refused.items():
        if cfg.get(key):
            raise FormatError(f"{cfg_path}: {key}={cfg[key]!r}: {what} is not an SAE sae_lit can load")
    if cfg.get("activation", "topk") != "topk":
        raise FormatError(f"{cfg_path}: activation {cfg['activation']!r} is not supported (topk)")
    # A key we do not know may change the computation; one that is off (false, 0, null) cannot.
    unknown = {k: v for k, v in cfg.items() if k not in _KNOWN and v not in (False, None, 0, "")}
    if unknown:
        raise FormatError(f"{cfg_path}: unknown setting(s) {unknown}: sae_lit does not know what they change")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    w = expect(tensors, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in),
                                        "b_dec": (d_in,)}, w_path)
    ours = cfg.get("sae_lit") or {}
    return SAEParts(
        W_enc=w["encoder.weight"], b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
        activation="topk", k=int(cfg["k"]),
        config={k: v for k, v in ours.items() if k not in ("d_in", "num_latents", "k", "activation", "normalize")}
        or {"multi_topk": bool(cfg.get("multi_topk", False))},
        description=description("topk", d_in, n, "sparsify", source or cfg_path, cfg.get("metadata") or {},
                                k=int(cfg["k"])),
    )


def write(sae: TopKSAE, out: Path, metadata: dict | None = None) -> Path:
    """Our TopK SAE as a sparsify folder (the dataset constant folded into the biases, as for
    SAELens); ``out`` is the hookpoint's folder."""
    if sae.activation != "topk":
        raise ValueError(f"sparsify holds TopK SAEs only; this one is {sae.activation!r} (export it as saelens)")
    if sae.normalize == "layer_norm":
        raise ValueError("sparsify has no input layer norm; export this layer_norm SAE as saelens")
    out.mkdir(parents=True, exist_ok=True)
    s = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    W_dec = sae.W_dec.detach().float()
    tensors = {
        "encoder.weight": sae.W_enc.detach().float().contiguous(),
        "encoder.bias": (sae.b_enc.detach().float() / s).contiguous(),
        "W_dec": W_dec.contiguous(),
        "b_dec": (sae.b_dec.detach().float() / s).contiguous(),
    }
    unit = bool(torch.allclose(W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=1e-4))
    cfg = {
        "activation": "topk", "expansion_factor": max(sae.num_latents // sae.d_in, 1), "normalize_decoder": unit,
        "num_latents": sae.num_latents, "k": sae.k, "multi_topk": sae.multi_topk, "skip_connection": False,
        "transcode": False, "d_in": sae.d_in,
        # Ours (sparsify drops keys it does not know).
        "metadata": dict(metadata or {}),
        "sae_lit": {**dataclasses.asdict(sae.cfg), "k_aux": sae.k_aux, "folded_input_scale": s},
    }
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(out / CFG_NAME, cfg)
    return out
