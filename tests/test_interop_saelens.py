"""SAELens files in our loader and our exports in SAELens, compared output for output with the real
package (the `interop` extra). Small SAEs are written by SAELens's own save_model; pre-6 configs
(which SAELens 6 still reads) are written in the layout older releases used."""
import json

import pytest
import torch
from safetensors.torch import save_file

from interop import assert_same_outputs, inputs
from sae_lit.model.formats import FormatError, export_sae, load_sae
from sae_lit.model.sae import TopKSAE

sae_lens = pytest.importorskip("sae_lens", reason="needs the interop extra: pip install -e '.[interop]'")

D, N, K = 16, 64, 5


def _randomize(sae, seed=0, threshold=False):
    """Random weights: decoder rows of any norm, biases of any sign (so the folds matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b") else 1.0))
        if threshold:
            sae.threshold.copy_(torch.rand(N, generator=g) * 2)
        if hasattr(sae, "r_mag"):
            sae.r_mag.mul_(0.3)
    return sae


def _theirs(sae, x):
    with torch.no_grad():
        codes = sae.encode(x)
        return sae.decode(codes), codes


def _saved(sae, tmp_path, name="sae"):
    sae.save_model(tmp_path / name)
    return tmp_path / name


def _cfg(**kw):
    return dict(d_in=D, d_sae=N, **kw)


CASES = {
    "standard": lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**_cfg())),
    "standard_no_b_dec_in_layer_norm": lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(
        **_cfg(apply_b_dec_to_input=False, normalize_activations="layer_norm"))),
    "topk": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**_cfg(k=K))),
    "topk_rescale_by_decoder_norm": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(
        **_cfg(k=K, rescale_acts_by_decoder_norm=True))),
    "topk_all_options": lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**_cfg(
        k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False, normalize_activations="layer_norm"))),
    "jumprelu": lambda: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**_cfg())),
    "jumprelu_no_b_dec_in": lambda: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**_cfg(apply_b_dec_to_input=False))),
    "gated": lambda: sae_lens.GatedSAE(sae_lens.GatedSAEConfig(**_cfg())),
    "gated_no_b_dec_in_layer_norm": lambda: sae_lens.GatedSAE(sae_lens.GatedSAEConfig(
        **_cfg(apply_b_dec_to_input=False, normalize_activations="layer_norm"))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_saelens_files_load_exactly(case, tmp_path):
    sae = _randomize(CASES[case](), threshold=case.startswith("jumprelu"))
    x = inputs(D)
    recon, codes = _theirs(sae, x)
    ours = load_sae(_saved(sae, tmp_path))
    assert_same_outputs(ours, x, recon, codes)
    # and the live object, through the same reader
    assert_same_outputs(load_sae(sae), x, recon, codes)


def test_rescale_acts_by_decoder_norm_is_not_ignored(tmp_path):
    """It used to load as if it were false (relative error ~0.45)."""
    sae = _randomize(CASES["topk_rescale_by_decoder_norm"]())
    path = _saved(sae, tmp_path)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is True
    x = inputs(D)
    recon, codes = _theirs(sae, x)
    assert_same_outputs(load_sae(path), x, recon, codes)
    cfg["rescale_acts_by_decoder_norm"] = False
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert (load_sae(path).reconstruct(x) - recon).norm() / recon.norm() > 1e-2  # the flag matters here


def test_expected_average_only_in_needs_the_scaling_factor(tmp_path):
    sae = _randomize(sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**_cfg(k=K, normalize_activations="expected_average_only_in"))))
    path = _saved(sae, tmp_path)
    with pytest.raises(FormatError, match="norm_scaling_factor"):
        load_sae(path)
    x = inputs(D)
    # SAELens's load_from_disk computes it unscaled ...
    raw = sae_lens.SAE.load_from_disk(path)
    assert_same_outputs(load_sae(path, norm_scaling_factor=1.0), x, *_theirs(raw, x))
    # ... and from_pretrained folds the release's factor in; so do we, given it or from the
    # training run's activation_scaler.json.
    folded = sae_lens.SAE.load_from_disk(path)
    folded.fold_activation_norm_scaling_factor(0.37)
    recon, codes = _theirs(folded, x)
    assert_same_outputs(load_sae(path, norm_scaling_factor=0.37), x, recon, codes)
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37, "has_whitening": False}))
    assert_same_outputs(load_sae(path), x, recon, codes)


def _pre6(tmp_path, sae, cfg: dict, extra_tensors=None):
    """A folder as SAELens < 6 wrote it: top-level hook/model keys, activation_fn_str, no version, and
    architecture "standard" even for TopK (the activation function said TopK)."""
    path = tmp_path / "pre6"
    path.mkdir()
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    save_file({**tensors, **(extra_tensors or {})}, str(path / "sae_weights.safetensors"))
    base = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
            "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1, "hook_point_head_index": None,
            "context_size": 128, "prepend_bos": True, "apply_b_dec_to_input": True, "normalize_activations": False}
    (path / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return path


def test_pre6_topk_config_loads_as_topk(tmp_path):
    """activation_fn_str "topk" + activation_fn_kwargs.k used to load as a ReLU SAE (relative error > 1)."""
    sae = _randomize(CASES["topk"]())
    path = _pre6(tmp_path, sae, {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}})
    theirs = sae_lens.SAE.load_from_disk(path)
    assert theirs.cfg.architecture() == "topk" and theirs.cfg.k == K
    x = inputs(D)
    ours = load_sae(path)
    assert ours.activation == "topk" and ours.k == K
    assert_same_outputs(ours, x, *_theirs(theirs, x))
    meta = ours.export_cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == "gpt2-small"


def test_pre6_relu_and_refusals(tmp_path):
    sae = _randomize(CASES["standard"]())
    path = _pre6(tmp_path, sae, {"activation_fn_str": "relu", "apply_b_dec_to_input": False})
    x = inputs(D)
    assert_same_outputs(load_sae(path), x, *_theirs(sae_lens.SAE.load_from_disk(path), x))
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value, match in [("activation_fn_str", "tanh-relu", "tanh-relu"),
                              ("activation_fn_kwargs", {"k": 3, "signed": True}, "signed"),
                              ("normalize_activations", "constant_norm_rescale", "constant_norm_rescale")]:
        topk = {"activation_fn_str": "topk"} if key == "activation_fn_kwargs" else {}
        (path / "cfg.json").write_text(json.dumps({**cfg, **topk, key: value}))
        with pytest.raises(FormatError, match=match):
            load_sae(path)


def test_pre6_finetuning_scaling_factor_scales_the_codes(tmp_path):
    """SAELens < 6 decoded (z * scaling_factor) @ W_dec + b_dec; folded into W_dec."""
    sae = _randomize(CASES["standard"]())
    s = torch.rand(N) + 0.5
    path = _pre6(tmp_path, sae, {"activation_fn_str": "relu", "finetuning_scaling_factor": True}, {"scaling_factor": s})
    x = inputs(D)
    w = {k: v.detach() for k, v in sae.state_dict().items()}
    z = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    assert_same_outputs(load_sae(path), x, (z * s) @ w["W_dec"] + w["b_dec"], z)
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": False}))
    with pytest.raises(FormatError, match="finetuning_scaling_factor"):
        load_sae(path)


def test_unsupported_saelens_settings_are_named(tmp_path):
    sae = _randomize(CASES["topk"]())
    path = _saved(sae, tmp_path)
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in [("architecture", "matching_pursuit"), ("normalize_activations", "covariance_whitening")]:
        (path / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(FormatError, match=f"cfg.json: {key} '{value}'"):
            load_sae(path)


def _ours(activation, normalize="constant", seed=0):
    sae = TopKSAE(D, N, k=K, activation=activation, normalize=normalize, seed=seed, tied_init=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=g))
        sae.input_scale.fill_(0.7)
        if activation == "gated":
            sae.act.r_mag.copy_(torch.randn(N, generator=g) * 0.3)
            sae.act.b_mag.copy_(torch.randn(N, generator=g) * 0.3)
        if activation == "batchtopk":
            sae.act.threshold.fill_(0.4)
        if activation == "jumprelu":
            sae.act.threshold.copy_(torch.rand(N, generator=g))
    return sae


@pytest.mark.parametrize("activation,normalize", [("topk", "constant"), ("topk", "layer_norm"), ("relu", "constant"),
                                                  ("gated", "constant"), ("batchtopk", "constant"),
                                                  ("jumprelu", "none"), ("relu", "layer_norm")])
def test_our_exports_load_in_saelens(activation, normalize, tmp_path):
    ours = _ours(activation, normalize)
    path = export_sae(ours, tmp_path / "sae", metadata={"model_name": "m", "hook_name": "blocks.0.hook_resid_post"},
                      density=torch.rand(N))
    theirs = sae_lens.SAE.load_from_disk(path)
    x = inputs(D)
    s = 1 / float(ours.input_scale) if normalize == "constant" else 1.0
    assert_same_outputs(ours, x, *_theirs(theirs, x), code_scale=s)
    # SAELens reads our sparsity file the way it reads its own
    from sae_lens.loading.pretrained_sae_loaders import load_safetensors_weights

    assert load_safetensors_weights(path / "sparsity.safetensors")["sparsity"].shape == (N,)


def test_a_live_saelens_sae_in_the_evals():
    """The evals' one adapter takes a SAELens SAE as it is (converted once, exactly)."""
    from interop import rel_err
    from sae_lit.evals.adapter import as_adapter, densify

    sae = _randomize(CASES["topk_all_options"]())
    x = inputs(D)
    recon, codes = _theirs(sae, x)
    adapter = as_adapter(sae)
    assert adapter.source is sae and adapter.ours and adapter.num_latents == N
    assert rel_err(adapter.reconstruct(x), recon) < 1e-5
    assert rel_err(densify(*adapter.encode(x), N), codes) < 1e-5
