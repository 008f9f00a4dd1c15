"""Hookpoint names of every library resolve to the right activations, on a Llama-style and a
GPT-2 model; a module's input is hooked (and edited) through its tap."""
import pytest
import torch

from sae_lit.data.hookpoints import model_key, parse_site, resolve_hookpoint, same_model, sae_hook_module, tl_hook_name
from sae_lit.data.subject import HookedForward, hookpoint_info, load_model
from sae_lit.evals.lm import edit_hookpoint


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320, n_positions=64)).eval().save_pretrained(path)
    return str(path)


def _ids():
    return torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def _captured(model, module_path, ids, want_input):
    """A module's input or output from a hook of our own (the reference)."""
    seen = {}
    module = model.get_submodule(module_path)

    def pre(m, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def post(m, i, o):
        seen["x"] = o[0] if isinstance(o, tuple) else o

    h = module.register_forward_pre_hook(pre, with_kwargs=True) if want_input else module.register_forward_hook(post)
    with torch.inference_mode():
        model(ids, use_cache=False)
    h.remove()
    return seen["x"]


SITES = {  # spec -> (llama module, gpt2 module, is the module's input)
    "resid_pre.1": ("model.layers.1", "transformer.h.1", True),
    "resid_mid.1": ("model.layers.1.post_attention_layernorm", "transformer.h.1.ln_2", True),
    "attn_out.1": ("model.layers.1.self_attn", "transformer.h.1.attn", False),
    "mlp_out.1": ("model.layers.1.mlp", "transformer.h.1.mlp", False),
    "mlp_post.1": ("model.layers.1.mlp.down_proj", "transformer.h.1.mlp.c_proj", True),
    "resid_post.1": ("model.layers.1", "transformer.h.1", False),
}
ALIASES = {"resid_pre.1": ["blocks.1.hook_resid_pre"],
           "resid_mid.1": ["blocks.1.hook_resid_mid", "resid_post_attn.1"],
           "attn_out.1": ["blocks.1.hook_attn_out", "resid_delta_attn.1"],
           "mlp_out.1": ["blocks.1.hook_mlp_out", "resid_delta_mlp.1"],
           "mlp_post.1": ["blocks.1.mlp.hook_post", "mlp_post_act.1"],
           "resid_post.1": ["blocks.1.hook_resid_post", "resid_post_mlp.1"]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", sorted(SITES))
def test_sites_are_the_right_activations(arch, spec, llama, gpt2_dir):
    model = llama if arch == "llama" else load_model(gpt2_dir, "cpu")
    path, want_input = SITES[spec][0 if arch == "llama" else 1], SITES[spec][2]
    ids = _ids()
    with torch.inference_mode():
        acts = HookedForward(model, spec)(ids)
        ref = _captured(model, path, ids, want_input)
        torch.testing.assert_close(acts, ref, rtol=0, atol=0)
        for alias in ALIASES[spec] + [path + (":input" if want_input else "")]:
            assert resolve_hookpoint(model, alias).module_path == resolve_hookpoint(model, spec).module_path, alias
            torch.testing.assert_close(HookedForward(model, alias)(ids), acts, rtol=0, atol=0)


def test_residual_identities(llama):
    ids = _ids()
    with torch.inference_mode():
        get = {s: HookedForward(llama, s)(ids) for s in SITES}
    torch.testing.assert_close(get["resid_mid.1"], get["resid_pre.1"] + get["attn_out.1"])
    torch.testing.assert_close(get["resid_post.1"], get["resid_mid.1"] + get["mlp_out.1"])


def test_editing_an_input_site(llama):
    """The evals replace the hookpoint's activation through a forward hook on its module: on a
    tap, that replaces the tapped module's input, as a pre-hook would."""
    ids = _ids()

    def edit(h):
        return h * 0.5

    with torch.inference_mode():
        with edit_hookpoint(llama, "resid_mid.1", edit):
            edited = llama(ids, use_cache=False).logits
        norm = llama.model.layers[1].post_attention_layernorm
        handle = norm.register_forward_pre_hook(lambda m, args: (edit(args[0]),))
        ref = llama(ids, use_cache=False).logits
        handle.remove()
        plain = llama(ids, use_cache=False).logits
    torch.testing.assert_close(edited, ref)
    assert not torch.allclose(edited, plain)
    assert sum(p.numel() for p in norm.hook_in.parameters()) == 0
    assert "model.layers.1.post_attention_layernorm.hook_in.weight" not in llama.state_dict()


def test_sparsify_names_and_widths(tiny_model_dir, gpt2_dir):
    assert hookpoint_info(tiny_model_dir, "layers.2")[0].module_path == "model.layers.2"
    assert hookpoint_info(gpt2_dir, "h.1.mlp")[0].module_path == "transformer.h.1.mlp"
    widths = {s: hookpoint_info(tiny_model_dir, s)[1] for s in SITES}
    assert widths == {"resid_pre.1": 32, "resid_mid.1": 32, "attn_out.1": 32, "mlp_out.1": 32, "mlp_post.1": 64,
                      "resid_post.1": 32}
    assert hookpoint_info(gpt2_dir, "mlp_post.0")[1] == 128 and hookpoint_info(gpt2_dir, "resid_mid.0")[1] == 32


def test_names_and_models():
    assert parse_site("resid_post_attn.4") == ("resid_mid", 4) and parse_site("model.layers.4") is None
    assert tl_hook_name("resid_delta_mlp.3") == "blocks.3.hook_mlp_out" and tl_hook_name("model.layers.1") is None
    assert same_model("gpt2-small", "gpt2") and same_model("HuggingFaceTB/SmolLM2-135M", "smollm2-135m")
    assert not same_model("gpt2", "/tmp/x/tiny_llama0") and same_model(None, "gpt2")
    assert model_key("/a/b/tiny_llama0/") == "tiny_llama0"


def test_published_hookpoints_on_a_model(llama):
    assert sae_hook_module({"hook_name": "blocks.1.hook_resid_post"}, llama) == "model.layers.1"
    both = {"hook_name": "blocks.1.hook_resid_post", "hf_hook_name": "model.layers.2"}
    assert sae_hook_module(both, llama) == "model.layers.2"
    assert sae_hook_module({"hook_name": "resid_post_attn.0"}, llama) == "model.layers.0.post_attention_layernorm.hook_in"
    assert sae_hook_module({"hook_name": "blocks.0.attn.hook_z"}, llama) is None  # not a site we have
    assert sae_hook_module({}, llama) is None


def test_cache_on_an_input_site(cache_kwargs):
    from sae_lit.data.cache import CacheConfig, build_cache

    cfg = CacheConfig(**{**cache_kwargs, "hookpoint": "blocks.1.hook_resid_mid", "train_tokens": 128, "val_tokens": 128})
    manifest = build_cache(cfg, progress=False).manifest
    assert manifest["hook_name"] == "model.layers.1.post_attention_layernorm.hook_in" and manifest["d_in"] == 32
