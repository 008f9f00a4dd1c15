import pytest
import torch

from sae_lit.data.subject import (
    EMBEDDED_MODEL,
    HookedForward,
    canonical_model,
    hookpoint_info,
    load_model,
    load_tokenizer,
    resolve_hookpoint,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu"), load_tokenizer(tiny_model_dir)


def _ids(n=2, t=12):
    return torch.randint(2, 300, (n, t), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def test_resid_post_equals_hidden_states(tiny):
    model, _ = tiny
    ids = _ids()
    hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[L+1] is block L's output, except the last entry which HF returns after the
    # final norm - so the check stops one block short.
    for layer in range(model.config.num_hidden_layers - 1):
        acts = HookedForward(model, f"resid_post.{layer}")(ids)
        torch.testing.assert_close(acts, hidden[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(HookedForward(model, f"blocks.{layer}.hook_resid_post")(ids), acts)


@torch.inference_mode()
def test_forward_stops_at_the_hookpoint(tiny):
    model, _ = tiny
    calls = []
    handles = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.model.layers)]
    handles.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        HookedForward(model, "resid_post.1")(_ids())
        assert calls == [0, 1]
        calls.clear()
        HookedForward(model, "model.layers.2.mlp")(_ids())
        assert calls == [0, 1]  # block 2 started but never finished
    finally:
        for h in handles:
            h.remove()
    # The hook is removed afterwards: a plain forward runs to the end.
    assert model(_ids(), use_cache=False).logits.shape[-1] == model.config.vocab_size


@torch.inference_mode()
def test_module_path_hookpoint_is_the_module_output(tiny):
    model, _ = tiny
    seen = {}
    h = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model(_ids(), use_cache=False)
    h.remove()
    torch.testing.assert_close(HookedForward(model, "model.layers.1.mlp")(_ids()), seen["out"])


def test_hookpoint_names_and_widths(tiny_model_dir):
    hp, d = hookpoint_info(tiny_model_dir, "resid_post.3")
    assert (hp.module_path, hp.block_index, d) == ("model.layers.3", 3, 32)
    assert hookpoint_info(tiny_model_dir, "resid_post.-1")[0].module_path == "model.layers.3"
    assert hookpoint_info(tiny_model_dir, "model.layers.0.mlp")[1] == 32
    assert hookpoint_info(tiny_model_dir, "model.layers.0.self_attn")[1] == 32
    assert hookpoint_info(tiny_model_dir, "model.layers.0.mlp.up_proj")[1] == 64
    # No Linear inside: found by a real forward instead.
    assert hookpoint_info(tiny_model_dir, "model.layers.0.mlp.act_fn")[1] == 64


def test_bad_hookpoints_are_explained(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="4 blocks"):
        resolve_hookpoint(model, "resid_post.4")
    with pytest.raises(ValueError, match="model.layers"):
        resolve_hookpoint(model, "transformer.h.0")


def test_model_specs(tmp_path, tiny_model_dir):
    assert canonical_model("embedded") == canonical_model("smollm2-135m") == EMBEDDED_MODEL
    assert canonical_model(tiny_model_dir) == str(__import__("pathlib").Path(tiny_model_dir).resolve())
    assert canonical_model("gpt2") == "gpt2"  # a hub id stays as written
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


@torch.inference_mode()
def test_embedded_smollm2():
    """The default subject model really loads from the installed package (about 20 s)."""
    hp, d_in = hookpoint_info("smollm2-135m", "resid_post.15")
    assert d_in == 576 and hp.module_path == "model.layers.15"
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.bos_token_id == 1
    model = load_model("smollm2-135m", "cpu")
    assert model.config.num_hidden_layers == 30
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer("In the beginning God created", add_special_tokens=False)["input_ids"]])
    acts = HookedForward(model, "resid_post.15")(ids)
    assert acts.shape == (1, ids.shape[1], 576) and torch.isfinite(acts).all()
