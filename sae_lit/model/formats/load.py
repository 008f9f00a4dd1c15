"""``load_sae(source)``: any SAE on disk, on the hub, or in memory -> our TopKSAE, taking raw
activations and computing what the owning library computes.

The format is told by the files:

    cfg.json + sae_weights.safetensors      SAELens (v6, or pre-6 by its config); ours
    cfg.json + sae.safetensors              sparsify (a folder per hookpoint)
    a .pt with encoder.weight, pre_bias, latent_bias, decoder.weight    openai/sparse_autoencoder
    ae.pt (+ config.json)                    dictionary_learning TopK / BatchTopK
    hf://owner/repo[/subfolder], owner/repo  any of these on the Hugging Face hub
    a live SAELens SAE or sparsify SparseCoder   converted from its config and tensors

Pickled files are read with torch's weights-only unpickler. What we cannot compute exactly is
refused with the file, key and value named.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sae_lit.model.formats import dictionary_learning, openai, saelens, sparsify
from sae_lit.model.formats.hub import fetch, split_hub
from sae_lit.model.formats.parts import FormatError, SAEParts, build_sae, description, load_pickled
from sae_lit.model.sae import TopKSAE

_PICKLES = (".pt", ".pth", ".bin")


def detect(path: Path) -> str:
    """The format of a local file or folder: saelens, sparsify, openai or dictionary_learning."""
    if path.is_file():
        if path.name in (saelens.WEIGHTS_NAME, saelens.CFG_NAME, sparsify.WEIGHTS_NAME):
            return detect(path.parent)
        if path.suffix in _PICKLES:
            state = load_pickled(path)
            if openai.is_state(state):
                return "openai"
            if dictionary_learning.is_state(state):
                return "dictionary_learning"
            raise FormatError(f"{path}: a state dict with keys {sorted(state)[:12]} is neither openai/sparse_autoencoder's "
                              "(encoder.weight, pre_bias, latent_bias, decoder.weight) nor dictionary_learning's "
                              "(encoder.weight, decoder.weight, b_dec, k)")
        raise FormatError(f"{path}: not an SAE file (expected a folder, or a .pt state dict)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if saelens.is_folder(path):
        return "saelens"
    if sparsify.is_folder(path):
        return "sparsify"
    if (path / dictionary_learning.WEIGHTS_NAME).is_file():
        return "dictionary_learning"
    inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (saelens.is_folder(p) or sparsify.is_folder(p)
                                                                     or (p / dictionary_learning.WEIGHTS_NAME).is_file()))
    if inner:
        raise FormatError(f"{path} holds {len(inner)} SAEs ({', '.join(inner[:8])}{', ...' if len(inner) > 8 else ''}): "
                          f"pick one, e.g. {path / inner[0]}")
    raise FormatError(f"{path}: no SAE here (found {sorted(p.name for p in path.iterdir())[:12]}); expected cfg.json + "
                      f"{saelens.WEIGHTS_NAME} (SAELens), cfg.json + {sparsify.WEIGHTS_NAME} (sparsify), "
                      f"{dictionary_learning.WEIGHTS_NAME} (dictionary_learning), or an OpenAI .pt file")


def read_parts(path: Path, fmt: str | None = None, norm_scaling_factor: float | None = None) -> SAEParts:
    fmt = fmt or detect(path)
    if fmt == "saelens":
        return saelens.read(path if path.is_dir() else path.parent, norm_scaling_factor)
    if norm_scaling_factor is not None:
        raise ValueError(f"norm_scaling_factor applies to SAELens expected_average_only_in SAEs, not to {fmt} files")
    if fmt == "sparsify":
        return sparsify.read(path if path.is_dir() else path.parent)
    if fmt == "openai":
        return openai.read(path)
    if fmt == "dictionary_learning":
        return dictionary_learning.read(path / dictionary_learning.WEIGHTS_NAME if path.is_dir() else path)
    raise ValueError(f"format {fmt!r} is not one of saelens, sparsify, openai, dictionary_learning")


def resolve(source: str | Path, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local path of a source, fetched from the hub first when it names a repository."""
    hub = split_hub(str(source), subfolder)
    if hub is not None:
        return fetch(*hub, revision=revision)
    path = Path(source).expanduser()
    return path / subfolder if subfolder else path


def load_sae(source, device: str | torch.device = "cpu", *, subfolder: str | None = None,
             revision: str | None = None, format: str | None = None,
             norm_scaling_factor: float | None = None) -> TopKSAE:
    """Any SAE as our TopKSAE (raw activations in, the owning library's outputs out).

    Args:
        source: a folder or file (see the module doc), ``hf://owner/repo[/subfolder]`` or a hub
            repository id, or a live SAELens ``SAE`` / sparsify ``SparseCoder`` / TopKSAE.
        device: where the SAE goes.
        subfolder: inside the source (a hub repository's folder for one hookpoint, say).
        revision: hub branch, tag or commit.
        format: skip detection (saelens, sparsify, openai, dictionary_learning).
        norm_scaling_factor: the dataset constant of a SAELens ``expected_average_only_in`` SAE
            when its folder has no activation_scaler.json.
    """
    if isinstance(source, TopKSAE):
        return source.to(device)
    if not isinstance(source, (str, Path)):
        return build_sae(parts_of_object(source), device)
    path = resolve(source, subfolder, revision)
    parts = read_parts(path, format, norm_scaling_factor)
    if str(source).startswith("hf://") or path != Path(source).expanduser():
        parts.description.update(source=str(source), **({"subfolder": subfolder} if subfolder else {}),
                                 **({"revision": revision} if revision else {}))
    return build_sae(parts, device)


# --- live objects ------------------------------------------------------------------------------


def _tensors(module) -> dict[str, Tensor]:
    return {k: v for k, v in module.state_dict().items() if isinstance(v, Tensor)}


def object_kind(sae) -> str | None:
    """"saelens" for a SAELens SAE (``cfg.to_dict()`` with an architecture, and W_enc), "sparsify"
    for a sparsify SparseCoder (``cfg.k`` and an ``encoder`` Linear), else None."""
    cfg = getattr(sae, "cfg", None)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict) and hasattr(sae, "W_enc") and "architecture" in to_dict():
        return "saelens"
    if cfg is not None and hasattr(cfg, "k") and isinstance(getattr(sae, "encoder", None), torch.nn.Linear):
        return "sparsify"
    return None


def parts_of_object(sae) -> SAEParts:
    """A SAELens SAE or a sparsify SparseCoder in memory, read through the same checks as their files."""
    kind, name = object_kind(sae), type(sae).__name__
    if kind == "saelens":
        state = _tensors(sae)
        if "finetuning_scaling_factor" in state:
            state["scaling_factor"] = state.pop("finetuning_scaling_factor")
        # In memory, SAELens leaves expected_average_only_in unscaled (input_scale 1, as parsed).
        return saelens.from_config(sae.cfg.to_dict(), state, f"<{name}>")
    if kind == "sparsify":
        to_dict = getattr(sae.cfg, "to_dict", None)
        d = dict(to_dict()) if callable(to_dict) else dict(vars(sae.cfg))
        return sparsify.from_config({**d, "d_in": int(sae.d_in)}, _tensors(sae), f"<{name}>")
    raise TypeError(f"{name}: not an SAE sae_lit can convert (a SAELens SAE, a sparsify SparseCoder, or a TopKSAE); "
                    "the evals also take any object with encode/decode through sae_lit.evals.adapter")


__all__ = ["FormatError", "description", "detect", "load_sae", "object_kind", "parts_of_object", "read_parts", "resolve"]
