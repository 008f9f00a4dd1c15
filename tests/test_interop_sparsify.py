"""sparsify folders in our loader and our sparsify exports in sparsify, compared with the real
package (the `interop` extra); SAEs written by sparsify's own save_to_disk."""
import json

import pytest
import torch

from interop import assert_same_outputs, inputs
from sae_lit.model.formats import FormatError, export_sae, load_sae
from sae_lit.model.sae import TopKSAE

sparsify = pytest.importorskip("sparsify", reason="needs the interop extra: pip install -e '.[interop]'")

D, N, K = 16, 64, 5


def _coder(seed=0, **cfg):
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, num_latents=N, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "bias" in name or name == "b_dec" else 1.0))
    return coder


def _theirs(coder, x):
    with torch.no_grad():
        out = coder.encode(x)
        codes = torch.zeros(x.shape[0], N).scatter_add_(1, out.top_indices, out.top_acts)
        return coder.decode(out.top_acts, out.top_indices), codes


def test_sparsify_folders_load_exactly(tmp_path):
    coder = _coder()
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.1")
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "k": K}))
    x = inputs(D)
    recon, codes = _theirs(coder, x)
    ours = load_sae(run / "layers.1")
    assert ours.activation == "topk" and ours.k == K and ours.num_latents == N
    assert_same_outputs(ours, x, recon, codes)
    meta = ours.export_cfg["metadata"]
    assert meta == {"hook_name": "layers.1", "model_name": "HuggingFaceTB/SmolLM2-135M"}
    assert_same_outputs(load_sae(coder), x, recon, codes)  # the live object
    with pytest.raises(FormatError, match="holds 1 SAEs"):
        load_sae(run)


def test_fewer_positive_latents_than_k(tmp_path):
    """ReLU then TopK (sparsify) vs TopK then ReLU (ours): the same when most codes are negative."""
    coder = _coder()
    with torch.no_grad():
        coder.encoder.bias.fill_(-20.0)
    coder.save_to_disk(tmp_path / "layers.0")
    x = inputs(D)
    recon, codes = _theirs(coder, x)
    assert ((codes > 0).sum(1) < K).any()
    assert_same_outputs(load_sae(tmp_path / "layers.0"), x, recon, codes)


@pytest.mark.parametrize("cfg,match", [({"skip_connection": True}, "skip connection"),
                                       ({"transcode": True}, "transcoder"),
                                       ({"activation": "groupmax"}, "groupmax")])
def test_what_sparsify_computes_differently_is_refused(cfg, match, tmp_path):
    _coder(**cfg).save_to_disk(tmp_path / "layers.0")
    with pytest.raises(FormatError, match=match):
        load_sae(tmp_path / "layers.0")


def test_unknown_setting_is_refused(tmp_path):
    _coder().save_to_disk(tmp_path / "layers.0")
    cfg_path = tmp_path / "layers.0" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "some_future_option": False}))
    load_sae(tmp_path / "layers.0")  # off: cannot change anything
    cfg_path.write_text(json.dumps({**cfg, "some_future_option": 2}))
    with pytest.raises(FormatError, match="some_future_option"):
        load_sae(tmp_path / "layers.0")


@pytest.mark.parametrize("normalize", ["constant", "none"])
def test_our_exports_load_in_sparsify(normalize, tmp_path):
    ours = TopKSAE(D, N, k=K, normalize=normalize, seed=3, multi_topk=True)
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.3)
        ours.b_dec.normal_()
        ours.input_scale.fill_(0.7)
    path = export_sae(ours, tmp_path / "layers.2", metadata={"model_name": "m"}, format="sparsify")
    coder = sparsify.SparseCoder.load_from_disk(path)
    assert coder.cfg.k == K and coder.num_latents == N and coder.cfg.multi_topk
    x = inputs(D)
    s = 1 / float(ours.input_scale) if normalize == "constant" else 1.0
    assert_same_outputs(ours, x, *_theirs(coder, x), code_scale=s)
    back = load_sae(path)  # and ours again, training options included
    assert back.multi_topk and back.export_cfg["format"] == "sparsify"
    torch.testing.assert_close(back.reconstruct(x), ours.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_sparsify_export_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="TopK SAEs only"):
        export_sae(TopKSAE(D, N, k=K, activation="relu"), tmp_path / "a", format="sparsify")
    with pytest.raises(ValueError, match="layer norm"):
        export_sae(TopKSAE(D, N, k=K, normalize="layer_norm"), tmp_path / "b", format="sparsify")


def test_a_live_sparse_coder_in_the_evals():
    """The evals' one adapter takes a sparsify SparseCoder as it is (converted once, exactly)."""
    from interop import rel_err
    from sae_lit.evals.adapter import as_adapter, densify

    coder = _coder()
    x = inputs(D)
    recon, codes = _theirs(coder, x)
    adapter = as_adapter(coder)
    assert adapter.source is coder and adapter.ours and adapter.k == K
    assert rel_err(adapter.reconstruct(x), recon) < 1e-5
    assert rel_err(densify(*adapter.encode(x), N), codes) < 1e-5
