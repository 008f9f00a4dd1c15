"""Export to, and load from, the SAELens v6 folder layout (DESIGN.md, "Export").

    <out>/cfg.json                  architecture, d_in, d_sae, k, ..., metadata
    <out>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

The dataset normalisation constant s is folded into the biases so the exported SAE takes
raw activations: for inputs scaled by s in training, TopK(W_enc(s x - b) + b_enc) selects
the same latents as TopK(W_enc(x - b/s) + b_enc/s) with values divided by s, and
W_dec z/s + b/s = (W_dec z + b)/s. So b_enc/s and b_dec/s, weights unchanged.

Architectures, by activation (sae_lit.model.activations):
    topk                  -> "topk"       (k)
    relu                  -> "standard"
    gated                 -> "gated"      (b_gate, r_mag, b_mag instead of b_enc; biases / s)
    batchtopk, matryoshka -> "jumprelu"   (their inference form; threshold [d_sae] = theta / s)
    prolu                 -> "prolu"      (no SAELens counterpart; our loader reads it)

A Lightning checkpoint becomes such a folder with `python -m sae_lit.training.export CKPT OUT_DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lit.common import atomic_path, write_json_atomic
from sae_lit.model.sae import SAEConfig, TopKSAE

ARCHITECTURES = {"topk": "topk", "relu": "standard", "gated": "gated", "batchtopk": "jumprelu",
                 "matryoshka": "jumprelu", "prolu": "prolu"}
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
# SAELens treats a cfg without a version as pre-6.0 and rewrites it; we write the v6 layout.
SAELENS_FORMAT_VERSION = "6.0.0"


def export_sae(sae: TopKSAE, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write ``sae`` to ``out_dir`` (see the module docstring). Refuses non-finite weights: an
    SAE that diverged (or saw NaN input) must not leave a loadable folder behind."""
    out = Path(out_dir)
    s = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    W_dec = sae.W_dec.detach().float()
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    tensors = {
        "W_enc": sae.W_enc.detach().float().t().contiguous(),
        "b_enc": (sae.b_enc.detach().float() / s).contiguous(),
        "W_dec": W_dec.contiguous(),
        "b_dec": (sae.b_dec.detach().float() / s).contiguous(),
    }
    arch = ARCHITECTURES[sae.activation]
    if arch == "gated":
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = sae.act.r_mag.detach().float().contiguous()
        tensors["b_mag"] = (sae.act.b_mag.detach().float() / s).contiguous()
    elif arch == "jumprelu":
        theta = float(sae.act.threshold)
        if theta < 0:
            raise ValueError(
                f"{sae.activation} SAE has no inference threshold yet (it is estimated during training): train it first"
            )
        tensors["threshold"] = torch.full((sae.num_latents,), theta / s)
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad or not math.isfinite(s):
        what = ", ".join(bad) if bad else f"the input scale ({s})"
        raise ValueError(
            f"Refusing to export to {out}: {what} hold NaN/Inf (training diverged, or its input activations did). "
            f"Nothing was written; export an earlier checkpoint (python -m sae_lit.training.export CKPT OUT)."
        )
    out.mkdir(parents=True, exist_ok=True)
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None}
    meta.update(metadata or {})
    cfg = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.normalize == "layer_norm" else "none",
        "reshape_activations": "none",
        "metadata": meta,
        # Our own keys (SAELens ignores them).
        "sae_lit": {**dataclasses.asdict(sae.cfg), "k_aux": sae.k_aux, "folded_input_scale": s},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    # Atomic: a crash mid-export never leaves a half-written SAE behind a valid name.
    # Weights first: cfg.json under its final name marks a complete folder.
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(out / CFG_NAME, cfg)
    return out


LOADABLE = {"topk": "topk", "standard": "relu", "gated": "gated", "jumprelu": "batchtopk", "prolu": "prolu"}


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
    """Read an exported folder (ours, or a SAELens v6 topk / standard / gated / jumprelu SAE
    with one shared threshold) into a TopKSAE that takes raw activations."""
    path = Path(path)
    cfg_path, w_path = path / CFG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: an SAE folder needs {CFG_NAME} and {WEIGHTS_NAME}")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture")
    if arch not in LOADABLE:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported (expected one of {sorted(LOADABLE)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise ValueError(f"{cfg_path}: normalize_activations {norm!r} is not supported (expected 'none' or 'layer_norm')")
    if not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input=false is not supported")
    ours = cfg.get("sae_lit", {})
    w = load_file(str(w_path), device=str(device))
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "gated":
        del shapes["b_enc"]
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    elif arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in w:
            raise KeyError(f"{w_path}: tensor {name!r} missing (found {sorted(w)})")
        if tuple(w[name].shape) != shape:
            raise ValueError(f"{w_path}: {name} has shape {tuple(w[name].shape)}, cfg.json implies {shape}")
    activation = LOADABLE[arch]
    if arch == "jumprelu":
        theta = w["threshold"]
        if not torch.allclose(theta, theta[0].expand_as(theta)):
            raise ValueError(f"{w_path}: per-latent JumpReLU thresholds are not supported (only one shared threshold)")
        activation = ours.get("activation", "batchtopk")
    k = int(cfg.get("k", ours.get("k", 1)))
    # Our own keys describe training (AuxK, Multi-TopK, init); the SAELens keys decide the
    # computation, so they win: the normalisation constant is folded into the weights.
    sae = TopKSAE(SAEConfig.from_dict({
        **ours, "d_in": d_in, "num_latents": d_sae, "k": k, "activation": activation,
        "normalize": "layer_norm" if norm == "layer_norm" else "none",
    }))
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].t())
        sae.b_enc.copy_(w["b_gate"] if arch == "gated" else w["b_enc"])
        sae.W_dec.copy_(w["W_dec"])
        sae.b_dec.copy_(w["b_dec"])
        if arch == "gated":
            sae.act.r_mag.copy_(w["r_mag"])
            sae.act.b_mag.copy_(w["b_mag"])
        elif arch == "jumprelu":
            sae.act.threshold.fill_(float(w["threshold"][0]))
        sae.initialized.fill_(True)
    sae.export_cfg = cfg
    return sae.to(device)
