"""The subject LM as the evals use it: full forwards with the hookpoint's output edited.

``subject.HookedForward`` stops at the hookpoint (for caching); the downstream, ablation and
N2G evals need the rest of the network too, so they run the whole model with a forward hook
that replaces the hookpoint's output.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from sae_lit.data.subject import resolve_hookpoint


def hook_module(model: nn.Module, hookpoint: str) -> nn.Module:
    return model.get_submodule(resolve_hookpoint(model, hookpoint).module_path)


@contextlib.contextmanager
def edit_hookpoint(model: nn.Module, hookpoint: str, edit: Callable[[Tensor], Tensor]):
    """Within the block, the hookpoint's output h [B, T, d] is replaced by edit(h). Blocks
    that return tuples (older transformers) keep their other elements."""

    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            return type(output)((edit(output[0]), *output[1:]))
        return edit(output)

    handle = hook_module(model, hookpoint).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


_FP32: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def float32_model(model: nn.Module) -> nn.Module:
    """``model`` itself if its floating-point weights are float32, else a float32 copy on the
    same device (made once per model): evals whose measure counts tiny logit changes (ablation
    sparsity) must not see bfloat16 rounding spread over every logit."""
    if all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()):
        return model
    if model not in _FP32:
        _FP32[model] = copy.deepcopy(model).float().eval().requires_grad_(False)
    return _FP32[model]


@torch.no_grad()
def logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Float32 logits [B, T, V]."""
    out = model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    return out.logits.float()


@torch.no_grad()
def hook_acts(model: nn.Module, hookpoint: str, input_ids: Tensor) -> Tensor:
    """Activations at the hookpoint [B, T, d] (the forward stops there)."""
    from sae_lit.data.subject import HookedForward

    return HookedForward(model, hookpoint)(input_ids.to(model_device(model)))


def token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token cross-entropy at each position that has a next token: [B, T-1]."""
    logp = logits[:, :-1].log_softmax(-1)
    target = input_ids[:, 1:].to(logits.device)
    return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def token_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per position [B, T] from logits over the vocabulary."""
    logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)
