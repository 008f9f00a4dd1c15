"""Hookpoints: where in the subject model an SAE reads its activations, named the ways the SAE
libraries name them, resolved to one module of a transformers model.

Specs (one string; L is a block index, negative counts from the end):

    resid_post.L   blocks.L.hook_resid_post   resid_post_mlp.L     block L's output
    resid_pre.L    blocks.L.hook_resid_pre                         block L's input
    resid_mid.L    blocks.L.hook_resid_mid    resid_post_attn.L    input of block L's pre-MLP norm
    attn_out.L     blocks.L.hook_attn_out     resid_delta_attn.L   output of block L's attention
    mlp_out.L      blocks.L.hook_mlp_out      resid_delta_mlp.L    output of block L's MLP
    mlp_post.L     blocks.L.mlp.hook_post     mlp_post_act.L       input of the MLP's output projection
    model.layers.5.mlp                                             a module path: that module's output
    model.layers.5.post_attention_layernorm:input                  ... or its input
    layers.5, h.5.mlp                                              paths inside the base model (sparsify)

The first column is ours, the second TransformerLens / SAELens (``blocks.L.hook_*``), the third
openai/sparse_autoencoder's locations. Several of them are the *input* of a module (nothing in a
transformers block outputs the residual stream between attention and MLP): for those an
``InputTap`` (an nn.Identity child named ``hook_in``) is attached to the module, with a pre-hook
that passes the module's input through it. The tap's output is then that input, so every consumer
that hooks a module's output (the cache's truncated forward, the evals' edits) handles input
hookpoints unchanged. The tap has no parameters: state dicts are unchanged.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from torch import nn

log = logging.getLogger(__name__)

TAP = "hook_in"
INPUT_SUFFIX = ":input"

# Every name of each standard site, by library: ours, TransformerLens (blocks.L.<tl>), OpenAI.
KINDS = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out", "mlp_post")
TL_NAMES = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
            "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_post": "mlp.hook_post"}
OPENAI_NAMES = {"resid_post_mlp": "resid_post", "resid_post_attn": "resid_mid", "resid_delta_attn": "attn_out",
                "resid_delta_mlp": "mlp_out", "mlp_post_act": "mlp_post"}
_ALIASES = {**{k: k for k in KINDS}, **OPENAI_NAMES}
_SHORT = re.compile(r"^(" + "|".join(sorted(_ALIASES, key=len, reverse=True)) + r")\.(-?\d+)$")
_TL = re.compile(r"^blocks\.(-?\d+)\.(" + "|".join(re.escape(v) for v in TL_NAMES.values()) + r")$")
_TL_KIND = {v: k for k, v in TL_NAMES.items()}

# Children of a block / MLP by role, in order of preference (GPT-2, Llama/Mistral/Qwen, Gemma-2,
# GPT-NeoX, ...). Gemma-2 has both post_attention_layernorm (after attention) and
# pre_feedforward_layernorm (before the MLP): the latter is the pre-MLP norm.
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_PRE_MLP_NORM = ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")
_MLP_OUT_PROJ = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")


@dataclass(frozen=True)
class Hookpoint:
    spec: str  # as the user wrote it, e.g. "resid_post.15"
    module_path: str  # module whose output is the activation, e.g. "model.layers.15" (the manifest's hook_name)
    block_index: int | None  # block the hookpoint sits in; the forward stops inside it


def parse_site(spec: str) -> tuple[str, int] | None:
    """(kind, layer) of a standard site in any library's spelling, None for module paths."""
    spec = spec.strip()
    m = _SHORT.match(spec)
    if m:
        return _ALIASES[m.group(1)], int(m.group(2))
    m = _TL.match(spec)
    if m:
        return _TL_KIND[m.group(2)], int(m.group(1))
    return None


def tl_hook_name(spec: str) -> str | None:
    """The TransformerLens / SAELens name of a standard site (blocks.L.hook_resid_post), else None."""
    site = parse_site(spec)
    return f"blocks.{site[1]}.{TL_NAMES[site[0]]}" if site and site[1] >= 0 else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the list whose length is the layer count (model.layers
    for llama/mistral/qwen, transformer.h for gpt2, gpt_neox.layers, ...)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the transformer blocks of {type(model).__name__} (no nn.ModuleList of "
            f"length num_hidden_layers={n_layers}); use a module path as hookpoint instead."
        )
    # The outermost list is the block stack; nested lists (e.g. experts) sit deeper.
    return min(candidates, key=lambda c: c[0].count("."))


class InputTap(nn.Identity):
    """Attached to a module as ``hook_in``; its output is that module's input (see the module doc)."""


def _through_tap(module: nn.Module, args: tuple, kwargs: dict):
    tap = getattr(module, TAP)
    if args:
        return (tap(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": tap(kwargs["hidden_states"])}
    raise RuntimeError(f"{type(module).__name__} was called without a positional input or hidden_states: "
                       "its input cannot be hooked")


def input_tap(model: nn.Module, module_path: str) -> str:
    """Module path of the tap on ``module_path``'s input, attaching it on first use."""
    module = model.get_submodule(module_path)
    if not isinstance(getattr(module, TAP, None), InputTap):
        module.add_module(TAP, InputTap())
        module.register_forward_pre_hook(_through_tap, with_kwargs=True)
    return f"{module_path}.{TAP}"


def _child(model: nn.Module, parent: str, names: tuple[str, ...], role: str, spec: str) -> str:
    module = model.get_submodule(parent)
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return f"{parent}.{name}"
    children = [n for n, _ in module.named_children()]
    raise ValueError(f"hookpoint {spec!r}: {parent} ({type(module).__name__}) has no {role} among {list(names)} "
                     f"(its children: {children}); name the module path instead")


def _site_module(model: nn.Module, kind: str, block: str, spec: str) -> str:
    if kind == "resid_post":
        return block
    if kind == "resid_pre":
        return input_tap(model, block)
    if kind == "attn_out":
        return _child(model, block, _ATTN, "attention", spec)
    if kind == "mlp_out":
        return _child(model, block, _MLP, "MLP", spec)
    if kind == "mlp_post":
        mlp = _child(model, block, _MLP, "MLP", spec)
        return input_tap(model, _child(model, mlp, _MLP_OUT_PROJ, "output projection", spec))
    assert kind == "resid_mid"
    if getattr(model.config, "use_parallel_residual", False) or getattr(model.config, "parallel_attn", False):
        raise ValueError(f"hookpoint {spec!r}: {type(model).__name__} runs attention and MLP in parallel, "
                         "so there is no residual stream between them")
    return input_tap(model, _child(model, block, _PRE_MLP_NORM, "pre-MLP norm", spec))


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def resolve_hookpoint(model: nn.Module, spec: str) -> Hookpoint:
    """The module (attaching an input tap if the site is a module's input) a hookpoint spec names."""
    blocks_path, blocks = find_blocks(model)
    spec = spec.strip()
    site = parse_site(spec)
    if site:
        kind, layer = site
        n = len(blocks)
        if not -n <= layer < n:
            raise ValueError(f"hookpoint {spec!r}: the model has {n} blocks (0..{n - 1}).")
        layer %= n
        return Hookpoint(spec, _site_module(model, kind, f"{blocks_path}.{layer}", spec), layer)
    path, want_input = (spec[: -len(INPUT_SUFFIX)], True) if spec.endswith(INPUT_SUFFIX) else (spec, False)
    if not _exists(model, path):
        # Names inside the base model (sparsify's "layers.5"): prefix the wrapper's attribute.
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and _exists(model, f"{prefix}.{path}"):
            path = f"{prefix}.{path}"
        else:
            raise ValueError(
                f"hookpoint {spec!r} is neither a site (resid_post.L, blocks.L.hook_resid_post, ...; see "
                f"sae_lit.data.hookpoints) nor a module path of {type(model).__name__} (blocks live at "
                f"{blocks_path!r}, e.g. {blocks_path}.0.mlp)."
            )
    module_path = input_tap(model, path) if want_input else path
    block_index = None
    if module_path.startswith(blocks_path + "."):
        block_index = int(module_path[len(blocks_path) + 1 :].split(".")[0])
    return Hookpoint(spec, module_path, block_index)


# --- published SAEs ------------------------------------------------------------------------


def sae_hookpoint(metadata: dict | None) -> str | None:
    """The hookpoint spec an SAE's metadata names (ours, else the HF module path SAELens records,
    else its hook_name in whichever library's spelling), None when it names none."""
    meta = metadata or {}
    for key in ("hookpoint", "hf_hook_name", "hook_name"):
        if meta.get(key):
            return str(meta[key])
    return None


def sae_hook_module(metadata: dict | None, model: nn.Module) -> str | None:
    """The module path (a cache manifest's hook_name) the SAE's hookpoint is on ``model``; None,
    with a warning, when its name cannot be resolved there (e.g. a TransformerLens-only hook)."""
    spec = sae_hookpoint(metadata)
    if spec is None:
        return None
    try:
        return resolve_hookpoint(model, spec).module_path
    except ValueError as e:
        log.warning("the SAE's hookpoint %r does not resolve on this model (%s); not checked", spec, e)
        return None


# TransformerLens aliases of hub ids, the names SAELens and OpenAI record.
_MODEL_ALIASES = {"gpt2-small": "gpt2", "gpt2small": "gpt2", "openai-community/gpt2": "gpt2"}


def model_key(name: str) -> str:
    """A model name reduced for comparison: aliases mapped, the hub org and a local path's
    folders dropped, case folded."""
    name = str(name).strip().rstrip("/").lower()
    name = _MODEL_ALIASES.get(name, name)
    return _MODEL_ALIASES.get(PurePosixPath(name).name, PurePosixPath(name).name)


def same_model(sae_model: str | None, data_model: str | None) -> bool:
    """False only when both are known and differ (unknown: nothing to say)."""
    return not sae_model or not data_model or model_key(sae_model) == model_key(data_model)
