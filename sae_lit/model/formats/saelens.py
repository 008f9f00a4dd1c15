"""The SAELens folder layout, read (v6 and the pre-6 configs of older releases) and written (v6).

    <dir>/cfg.json                  architecture, d_in, d_sae, k, ..., metadata
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    <dir>/sparsity.safetensors      optional: "sparsity" [d_sae], log10 of each latent's firing density

Read: architectures standard, topk, jumprelu (a threshold per latent), gated; apply_b_dec_to_input
either way; rescale_acts_by_decoder_norm; normalize_activations none, layer_norm (the same
per-token norm as ours) and expected_average_only_in (a dataset constant s, inputs times s: SAELens
itself leaves it to the caller, from its release list or the training run's activation_scaler.json,
so it is read from that file next to the weights or passed as ``norm_scaling_factor``).
Pre-6 configs (no sae_lens_version, or one below 6) name TopK by ``activation_fn_str: "topk"`` and
``activation_fn_kwargs: {k}``, a boolean normalize_activations, and may scale the codes by a
``scaling_factor`` tensor (``finetuning_scaling_factor``), folded into W_dec.

Written: our SAE taking raw activations. The dataset constant s (normalize "constant") is folded
into the biases: for inputs scaled by s in training, TopK(W_enc(s x - b) + b_enc) selects the same
latents as TopK(W_enc(x - b/s) + b_enc/s) with values divided by s, and W_dec z/s + b/s =
(W_dec z + b)/s. So b_enc/s, b_dec/s (and thresholds / s, Gated's b_mag / s), weights unchanged.

    ours                   SAELens architecture
    topk                   topk
    relu                   standard
    gated                  gated        (b_gate, r_mag, b_mag instead of b_enc)
    jumprelu               jumprelu     (threshold [d_sae])
    batchtopk, matryoshka  jumprelu     (their inference form; threshold theta for every latent)
    prolu                  prolu        (no SAELens counterpart; our loader reads it)
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lit.common import atomic_path, write_json_atomic
from sae_lit.model.formats.parts import FormatError, SAEParts, description, expect
from sae_lit.model.sae import TopKSAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
SCALER_NAME = "activation_scaler.json"
# SAELens treats a cfg without a version as pre-6.0 and rewrites it; we write the v6 layout.
SAELENS_FORMAT_VERSION = "6.0.0"

ARCHITECTURES = {"topk": "topk", "relu": "standard", "gated": "gated", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu", "matryoshka": "jumprelu", "prolu": "prolu"}
READABLE = {"topk": "topk", "standard": "relu", "gated": "gated", "jumprelu": "jumprelu", "prolu": "prolu"}
NORMALIZATIONS = ("none", "layer_norm", "expected_average_only_in")
# Config keys of the metadata (SAELens LLM_METADATA_KEYS) that pre-6 configs keep at the top level.
_METADATA_KEYS = ("model_name", "hook_name", "hf_hook_name", "hook_head_index", "model_class_name",
                  "model_from_pretrained_kwargs", "context_size", "prepend_bos", "dataset_path",
                  "neuronpedia_id", "seqpos_slice", "sae_lens_training_version", "exclude_special_tokens")


def is_folder(path: Path) -> bool:
    return (path / CFG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _major(version) -> int:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else 0


def _from_pre6(cfg: dict, path: Path) -> dict:
    """A pre-6 config in v6 terms (the keys that decide the computation, and the metadata)."""
    renamed = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    old = {renamed.get(k, k): v for k, v in cfg.items()}
    arch = old.get("architecture", "standard")
    fn = old.get("activation_fn") or "relu"
    kwargs = dict(old.get("activation_fn_kwargs") or {})
    new = {"architecture": arch, "d_in": old.get("d_in"), "d_sae": old.get("d_sae"),
           "apply_b_dec_to_input": old.get("apply_b_dec_to_input", True),
           "finetuning_scaling_factor": bool(old.get("finetuning_scaling_factor", False)),
           "metadata": {k: old[k] for k in _METADATA_KEYS if k in old}}
    if fn == "topk":
        if arch not in ("standard", "topk"):
            raise FormatError(f"{path}: activation_fn 'topk' with architecture {arch!r} is not an SAELens combination")
        if "k" not in kwargs:
            raise FormatError(f"{path}: activation_fn 'topk' without activation_fn_kwargs.k")
        new.update(architecture="topk", k=int(kwargs.pop("k")))
    elif fn != "relu":
        raise FormatError(f"{path}: activation_fn {fn!r} is not supported (relu or topk)")
    if kwargs.pop("signed", False):
        raise FormatError(f"{path}: activation_fn_kwargs.signed=true (signed TopK) is not supported")
    if kwargs:
        raise FormatError(f"{path}: activation_fn_kwargs {kwargs} not supported (only k)")
    norm = old.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    new["normalize_activations"] = norm
    return new


def _scaling_factor(folder: Path, given: float | None, cfg_path: Path) -> float:
    if given is not None:
        return float(given)
    scaler = folder / SCALER_NAME
    if scaler.is_file():
        data = json.loads(scaler.read_text())
        if data.get("has_whitening"):
            raise FormatError(f"{scaler}: has_whitening=true (covariance whitening) is not supported")
        if data.get("scaling_factor") is not None:
            return float(data["scaling_factor"])
    raise FormatError(
        f"{cfg_path}: normalize_activations 'expected_average_only_in' needs the dataset scaling factor, which the "
        f"files do not hold (no {SCALER_NAME}): pass norm_scaling_factor= (SAELens lists it per release as "
        "norm_scaling_factor), or norm_scaling_factor=1.0 to compute what SAELens's load_from_disk does (no scaling)"
    )


def read(folder: Path, norm_scaling_factor: float | None = None) -> SAEParts:
    cfg_path, w_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    parts = from_config(json.loads(cfg_path.read_text()), load_file(str(w_path)), cfg_path, w_path, folder)
    if parts.normalize == "constant":
        parts.input_scale = _scaling_factor(folder, norm_scaling_factor, cfg_path)
    elif norm_scaling_factor is not None:
        raise ValueError(f"{cfg_path}: norm_scaling_factor given, but normalize_activations is "
                         f"{parts.description['normalize_activations']!r}, not 'expected_average_only_in'")
    return parts


def from_config(cfg: dict, tensors: dict, cfg_path, w_path=None, source=None) -> SAEParts:
    """SAEParts from a SAELens config dict and its tensors (``cfg_path`` / ``w_path`` name them in
    errors). expected_average_only_in gives normalize "constant" with input_scale 1 (SAELens's
    own computation); the caller sets the dataset's scale."""
    w_path = w_path or cfg_path
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    pre6 = _major(version) < 6
    if pre6:
        cfg = _from_pre6(cfg, cfg_path)
    arch = cfg.get("architecture", "standard")
    if arch not in READABLE:
        raise FormatError(f"{cfg_path}: architecture {arch!r} is not supported (one of {sorted(READABLE)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        raise FormatError(f"{cfg_path}: normalize_activations {norm!r} is not supported (one of {list(NORMALIZATIONS)})")
    ours = cfg.get("sae_lit") or {}
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "gated":
        del shapes["b_enc"]
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    elif arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    w = expect(tensors, shapes, w_path, optional=("scaling_factor",))
    W_dec = w["W_dec"]
    if "scaling_factor" in w:
        s = w.pop("scaling_factor")
        if s.shape != (d_sae,):
            raise FormatError(f"{w_path}: scaling_factor has shape {tuple(s.shape)}, expected ({d_sae},)")
        if not torch.equal(s, torch.ones_like(s)):
            if not cfg.get("finetuning_scaling_factor", False):
                raise FormatError(f"{w_path}: a scaling_factor other than 1 but finetuning_scaling_factor is false")
            W_dec = W_dec * s[:, None]  # pre-6 decode: (z * s) @ W_dec
    activation = READABLE[arch]
    threshold = w.get("threshold")
    one_theta = arch == "jumprelu" and bool((threshold == threshold[0]).all())
    if one_theta and ours.get("activation") in ("batchtopk", "matryoshka"):
        activation, threshold = ours["activation"], threshold[0]  # our own BatchTopK export: one theta
    k = int(cfg["k"]) if arch == "topk" else int(ours.get("k", 1))
    metadata = dict(cfg.get("metadata") or {})
    return SAEParts(
        W_enc=w["W_enc"].t(), b_enc=w["b_gate"] if arch == "gated" else w["b_enc"], W_dec=W_dec, b_dec=w["b_dec"],
        activation=activation, k=k, threshold=threshold, r_mag=w.get("r_mag"), b_mag=w.get("b_mag"),
        normalize={"none": "none", "layer_norm": "layer_norm", "expected_average_only_in": "constant"}[norm],
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and arch == "topk",
        # Our own keys describe training (AuxK, Multi-TopK, init); the SAELens keys decide the
        # computation, so they win.
        config={k: v for k, v in ours.items() if k not in ("d_in", "num_latents", "k", "activation", "normalize")},
        description=description(arch, d_in, d_sae, "saelens" if not pre6 else "saelens-pre6", source or cfg_path,
                                metadata,
                                **({"k": k} if arch == "topk" else {}), normalize_activations=norm,
                                **({"sae_lit": ours} if ours else {})),
    )


def write(sae: TopKSAE, out: Path, metadata: dict | None = None, density: torch.Tensor | None = None) -> Path:
    """Our SAE as a SAELens v6 folder taking raw activations; ``density``: each latent's firing
    frequency, written as sparsity.safetensors (log10, as SAELens does)."""
    out.mkdir(parents=True, exist_ok=True)
    s = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    tensors = {
        "W_enc": sae.W_enc.detach().float().t().contiguous(),
        "b_enc": (sae.b_enc.detach().float() / s).contiguous(),
        "W_dec": sae.W_dec.detach().float().contiguous(),
        "b_dec": (sae.b_dec.detach().float() / s).contiguous(),
    }
    arch = ARCHITECTURES[sae.activation]
    if arch == "gated":
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors["r_mag"] = sae.act.r_mag.detach().float().contiguous()
        tensors["b_mag"] = (sae.act.b_mag.detach().float() / s).contiguous()
    elif arch == "jumprelu":
        theta = sae.act.threshold.detach().float()
        if theta.dim() == 0:
            if float(theta) < 0:
                raise ValueError(f"{sae.activation} SAE has no inference threshold yet (it is estimated during "
                                 "training): train it first")
            theta = theta.expand(sae.num_latents)
        tensors["threshold"] = (theta / s).contiguous()
    cfg = config(sae, metadata)
    # Atomic: a crash mid-export never leaves a half-written SAE behind a valid name.
    # Weights first: cfg.json under its final name marks a complete folder.
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    if density is not None:
        write_sparsity(out, density)
    write_json_atomic(out / CFG_NAME, cfg)
    return out


def write_sparsity(out: Path, density: torch.Tensor) -> None:
    """Each latent's firing frequency as SAELens's sparsity.safetensors: log10(frequency + 1e-10)."""
    with atomic_path(out / SPARSITY_NAME) as tmp:
        save_file({"sparsity": torch.log10(density.detach().double().cpu() + 1e-10).float()}, str(tmp))


def config(sae, metadata: dict | None = None) -> dict:
    """The cfg.json of our SAE in the SAELens layout (a TopKSAE, or a latent shard of one: it
    describes the whole SAE either way)."""
    s = float(sae.input_scale) if sae.normalize == "constant" else 1.0
    arch = ARCHITECTURES[sae.activation]
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
    return cfg
