"""What every reader produces: an SAE's tensors in our layout plus the options that decide its
computation, and the one place that turns them into a TopKSAE.

Other libraries compute a few things differently from TopKSAE; each is folded into the weights
exactly (in float64), so the loaded SAE has no switches of its own for them:

- ``apply_b_dec_to_input = False`` (SAELens): pre = W_enc x + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec),
  so b_enc += W_enc b_dec (Gated: b_gate += W_enc b_dec, b_mag += (W_enc * exp(r_mag)) b_dec).
- ``rescale_acts_by_decoder_norm`` (SAELens TopK): pre is scaled by ||W_dec_j|| before the top-k and
  the codes divided by it before decoding; scaling row j of W_enc and b_enc_j by ||W_dec_j|| and
  dividing W_dec's row j by it gives the same latents and reconstruction.
- ReLU then TopK (sparsify, dictionary_learning) instead of TopK then ReLU: the same reconstruction
  and the same active latents (when fewer than k pre-activations are positive, the others are 0
  either way).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sae_lit.model.sae import SAEConfig, TopKSAE


class FormatError(ValueError):
    """A file we cannot load exactly: the message names the file, the key and its value."""


@dataclass
class SAEParts:
    W_enc: Tensor
    """[n, d_in] encoder rows (our layout; SAELens stores the transpose)."""
    b_enc: Tensor
    """[n] encoder bias (Gated: the gate's bias)."""
    W_dec: Tensor
    """[n, d_in] decoder rows, any norm."""
    b_dec: Tensor
    """[d_in] decoder bias (subtracted from the input when apply_b_dec_to_input)."""
    activation: str
    """One of sae_lit.model.sae.Activation."""
    k: int = 1
    threshold: Tensor | None = None
    """JumpReLU: [n] per-latent thresholds; BatchTopK: one value."""
    r_mag: Tensor | None = None
    b_mag: Tensor | None = None
    normalize: str = "none"
    """"none", "layer_norm" or "constant" (inputs times input_scale)."""
    input_scale: float = 1.0
    apply_b_dec_to_input: bool = True
    rescale_by_decoder_norm: bool = False
    config: dict = field(default_factory=dict)
    """Our own SAEConfig fields when the file has them (training options: AuxK, Multi-TopK, ...)."""
    description: dict = field(default_factory=dict)
    """What the loaded SAE keeps as ``export_cfg``: SAELens-shaped (architecture, d_in, d_sae,
    metadata {model_name, hook_name, ...}) plus ``format`` and ``source``."""


def expect(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], path: Path | str,
           optional: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The named tensors as float32, checked for presence and shape; any other tensor is an error
    (we do not know what it would change)."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise FormatError(f"{path}: tensor {name!r} missing (found {sorted(tensors)})")
        if tuple(tensors[name].shape) != tuple(shape):
            raise FormatError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    extra = sorted(set(tensors) - set(shapes) - set(optional))
    if extra:
        raise FormatError(f"{path}: unexpected tensor(s) {extra}: sae_lit does not know what they change, so it "
                          "does not load this file")
    return {name: t.detach().to("cpu", torch.float32) for name, t in tensors.items()}


def load_pickled(path: Path) -> dict:
    """A pickled file's contents, with torch's weights-only unpickler (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler's errors have many types
        raise FormatError(f"{path}: not loadable as a weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _matvec(W: Tensor, v: Tensor, rows: int = 8192) -> Tensor:
    """W @ v accumulated in float64, a block of rows at a time (no float64 copy of all of W)."""
    v = v.double()
    return torch.cat([W[i : i + rows].double() @ v for i in range(0, W.shape[0], rows)])


@torch.no_grad()
def build_sae(parts: SAEParts, device: str | torch.device = "cpu") -> TopKSAE:
    p = parts
    n, d = p.W_enc.shape
    W_enc, W_dec = p.W_enc, p.W_dec
    b_enc = p.b_enc.double()
    b_mag = p.b_mag.double() if p.b_mag is not None else None
    if not p.apply_b_dec_to_input:
        b_enc = b_enc + _matvec(W_enc, p.b_dec)
        if b_mag is not None:
            b_mag = b_mag + _matvec(W_enc, p.b_dec) * p.r_mag.double().exp()
    if p.rescale_by_decoder_norm:
        norms = W_dec.double().norm(dim=1).clamp_min(1e-8)  # SAELens clamps the same way
        W_enc, b_enc = W_enc * norms.float()[:, None], b_enc * norms
        W_dec = W_dec / norms.float()[:, None]
    cfg = SAEConfig.from_dict({**p.config, "d_in": d, "num_latents": n, "k": p.k, "activation": p.activation,
                               "normalize": p.normalize})
    sae = TopKSAE(cfg)
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(b_enc)
    sae.W_dec.copy_(W_dec)
    sae.b_dec.copy_(p.b_dec)
    sae.input_scale.fill_(p.input_scale)
    if p.activation == "gated":
        sae.act.r_mag.copy_(p.r_mag)
        sae.act.b_mag.copy_(b_mag)
    elif p.activation in ("jumprelu", "batchtopk", "matryoshka"):
        sae.act.threshold.copy_(p.threshold.reshape(sae.act.threshold.shape))
    sae.initialized.fill_(True)
    sae.export_cfg = p.description
    return sae.to(device)


def description(architecture: str, d_in: int, d_sae: int, fmt: str, source: Path | str, metadata: dict,
                **extra) -> dict:
    return {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "format": fmt,
            "source": str(source), **extra, "metadata": {k: v for k, v in metadata.items() if v is not None}}


def refuse_non_finite(tensors: dict[str, Tensor], out, scale: float = 1.0) -> None:
    """Refuse to export weights holding NaN/Inf: an SAE that diverged (or saw NaN input) must
    not leave a loadable folder behind. Nothing is written when this raises."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad or not math.isfinite(scale):
        what = ", ".join(bad) if bad else f"the input scale ({scale})"
        raise ValueError(
            f"Refusing to export to {out}: {what} hold NaN/Inf (training diverged, or its input activations did). "
            f"Nothing was written; export an earlier checkpoint (python -m sae_lit.training.export CKPT OUT)."
        )
