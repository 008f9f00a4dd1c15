"""openai/sparse_autoencoder's files: the torch.save'd state dict of its Autoencoder.

    encoder.weight [n, d]   pre_bias [d]   latent_bias [n]   decoder.weight [d, n]
    activation              "TopK" (then activation_state_dict {k, postact_fn: "ReLU"}) or "ReLU"
    stats_last_nonzero, latents_activation_frequency, latents_mean_square   training statistics

latents = activation(encoder(x - pre_bias) + latent_bias), recons = decoder(latents) + pre_bias.
Its loader turns on a per-token layer norm exactly when the activation is TopK (the released v5
SAEs): x -> (x - mean) / (unbiased std + 1e-5), undone after decoding with the std alone. That is
our normalize "layer_norm" (the same formula, on purpose).

The released files sit at ``.../<location>_<version>/autoencoders/<layer>.pt`` (gpt2-small); the
location and layer are read off such a path as the hookpoint (OpenAI's names, e.g. resid_post_mlp.6).
"""
from __future__ import annotations

import re
from pathlib import Path

from sae_lit.model.formats.parts import FormatError, SAEParts, description, expect, load_pickled

KEYS = ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias")
_STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
_LOCATION = re.compile(r"^(resid_delta_attn|resid_delta_mlp|resid_post_attn|resid_post_mlp|mlp_post_act)(?:_.*)?$")


def is_state(state: dict) -> bool:
    return all(k in state for k in KEYS)


def _hookpoint(path: Path) -> dict:
    parts = path.resolve().parts
    meta = {}
    if "gpt2-small" in parts:
        meta["model_name"] = "gpt2"
    m = _LOCATION.match(path.parent.parent.name) if path.parent.name == "autoencoders" else None
    if m and path.stem.isdigit():
        meta["hook_name"] = f"{m.group(1)}.{int(path.stem)}"
    return meta


def read(path: Path, state: dict | None = None) -> SAEParts:
    state = dict(state if state is not None else load_pickled(path))
    activation = state.pop("activation", "ReLU")
    act_state = dict(state.pop("activation_state_dict", {}) or {})
    for key in _STATS:
        state.pop(key, None)
    n, d = state["encoder.weight"].shape
    w = expect(state, {"encoder.weight": (n, d), "decoder.weight": (d, n), "pre_bias": (d,), "latent_bias": (n,)}, path)
    if activation == "TopK":
        postact = act_state.pop("postact_fn", "ReLU")
        if postact != "ReLU":
            raise FormatError(f"{path}: activation_state_dict.postact_fn {postact!r} is not supported (ReLU)")
        if "k" not in act_state:
            raise FormatError(f"{path}: activation 'TopK' without activation_state_dict.k")
        k, ours, normalize = int(act_state.pop("k")), "topk", "layer_norm"
    elif activation == "ReLU":
        k, ours, normalize = 1, "relu", "none"
    else:
        raise FormatError(f"{path}: activation {activation!r} is not supported (TopK or ReLU)")
    if act_state:
        raise FormatError(f"{path}: activation_state_dict keys {sorted(act_state)} not supported")
    arch = "topk" if ours == "topk" else "standard"
    return SAEParts(
        W_enc=w["encoder.weight"], b_enc=w["latent_bias"], W_dec=w["decoder.weight"].t(), b_dec=w["pre_bias"],
        activation=ours, k=k, normalize=normalize,
        description=description(arch, d, n, "openai", path, _hookpoint(path), **({"k": k} if ours == "topk" else {}),
                                normalize_activations=normalize),
    )
