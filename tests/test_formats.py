"""Format detection, the OpenAI and dictionary_learning files (written from their published
state-dict layouts; outputs checked against the published formulas computed by hand), hub
sources (offline, from a local folder laid out as a hub cache), and the refusals."""
import json
import shutil

import pytest
import torch

from interop import assert_same_outputs, inputs
from sae_lit import load_sae
from sae_lit.model.formats import FormatError, detect, export_sae
from sae_lit.model.sae import TopKSAE

D, N, K = 16, 64, 5


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- openai/sparse_autoencoder ------------------------------------------------------------------


def openai_state(activation="TopK", k=K):
    """Autoencoder.state_dict() of openai/sparse_autoencoder: its parameters and statistics
    buffers, plus the activation's class name and state."""
    state = {
        "pre_bias": _rand(D, seed=1, scale=0.5), "encoder.weight": _rand(N, D, seed=2),
        "latent_bias": _rand(N, seed=3, scale=0.3),
        "decoder.weight": _rand(D, N, seed=4) / 4, "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N), "latents_mean_square": torch.zeros(N), "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


def openai_forward(state, x):
    """The published computation: for TopK files, x -> (x - mean) / (unbiased std + 1e-5) first,
    latents = act(W_enc (x - pre_bias) + latent_bias), recons = W_dec latents + pre_bias, and the
    norm undone (times std, plus mean)."""
    topk = state["activation"] == "TopK"
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5) if topk else x
    pre = (xn - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    if topk:
        v, i = pre.topk(state["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        z = pre.relu()
    recon = z @ state["decoder.weight"].T + state["pre_bias"]
    return (recon * std + mu if topk else recon), z


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_files(activation, tmp_path):
    path = tmp_path / "gpt2-small" / "resid_post_attn_v5_32k" / "autoencoders" / "3.pt"
    path.parent.mkdir(parents=True)
    state = openai_state(activation)
    torch.save(state, path)
    assert detect(path) == "openai"
    ours = load_sae(path)
    x = inputs(D)
    assert_same_outputs(ours, x, *openai_forward(state, x))
    assert ours.normalize == ("layer_norm" if activation == "TopK" else "none")
    assert ours.export_cfg["metadata"] == {"model_name": "gpt2", "hook_name": "resid_post_attn.3"}


def test_openai_refusals(tmp_path):
    path = tmp_path / "ae.pt"
    for change, match in [({"activation": "Identity"}, "activation 'Identity'"),
                          ({"activation_state_dict": {"k": K, "postact_fn": "Identity"}}, "postact_fn"),
                          ({"tied_bias": torch.zeros(D)}, "tied_bias")]:
        torch.save({**openai_state(), **change}, path)
        with pytest.raises(FormatError, match=match):
            load_sae(path)


class Payload:
    """Not a tensor: a weights-only load refuses to build it."""


def test_pickles_are_loaded_weights_only(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({**openai_state(), "extra": Payload()}, path)
    with pytest.raises(FormatError, match="weights-only"):
        load_sae(path)


# --- dictionary_learning ------------------------------------------------------------------------


def dl_folder(tmp_path, dict_class="AutoEncoderTopK", threshold=-1.0):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    state = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold),
             "decoder.weight": _rand(D, N, seed=5) / 4, "encoder.weight": _rand(N, D, seed=6),
             "encoder.bias": _rand(N, seed=7, scale=0.3), "b_dec": _rand(D, seed=8, scale=0.5)}
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": dict_class, "trainer_class": "TopKTrainer", "activation_dim": D, "dict_size": N,
                    "k": K, "lm_name": "google/gemma-2-2b", "layer": 1, "submodule_name": "resid_post_layer_1"},
        "buffer": {"d_submodule": D, "io": "out", "ctx_len": 128}}))
    return folder, state


def dl_forward(state, x, dict_class):
    """AutoEncoderTopK: TopK(ReLU(enc(x - b_dec))); BatchTopKSAE's default encode: ReLU(pre) where
    it exceeds the threshold. Decoded as decoder(z) + b_dec."""
    post = ((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"]).relu()
    if dict_class == "AutoEncoderTopK":
        v, i = post.topk(int(state["k"]), dim=-1)
        z = torch.zeros_like(post).scatter(-1, i, v)
    else:
        z = post * (post > state["threshold"])
    return z @ state["decoder.weight"].T + state["b_dec"], z


@pytest.mark.parametrize("dict_class,threshold", [("AutoEncoderTopK", 0.8), ("BatchTopKSAE", 0.8), ("BatchTopKSAE", -1.0)])
def test_dictionary_learning_files(dict_class, threshold, tmp_path):
    folder, state = dl_folder(tmp_path, dict_class, threshold)
    assert detect(folder) == detect(folder / "ae.pt") == "dictionary_learning"
    ours = load_sae(folder)
    expected = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk" if threshold >= 0 else "relu"}[dict_class]
    assert ours.activation == expected
    x = inputs(D)
    assert_same_outputs(ours, x, *dl_forward(state, x, dict_class))
    meta = ours.export_cfg["metadata"]
    assert meta["hook_name"] == "resid_post.1" and meta["model_name"] == "google/gemma-2-2b"


def test_dictionary_learning_needs_its_config(tmp_path):
    folder, _ = dl_folder(tmp_path, "MatryoshkaBatchTopKSAE")
    with pytest.raises(FormatError, match="MatryoshkaBatchTopKSAE"):
        load_sae(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json"):
        load_sae(folder)


# --- detection, hub -----------------------------------------------------------------------------


def test_detection_explains_what_it_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sae(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FormatError, match="no SAE here"):
        load_sae(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(FormatError, match="neither openai"):
        load_sae(tmp_path / "other.pt")


def _hub_snapshot(cache, repo, files: dict):
    """A folder laid out as huggingface_hub's cache: models--owner--repo/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / sha
    for rel, src in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snapshot / rel)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    return sha


def test_hub_sources_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    ours = TopKSAE(D, N, k=K, seed=0)
    with torch.no_grad():
        ours.b_dec.normal_()
    local = export_sae(ours, tmp_path / "local" / "blocks.1.hook_resid_post")
    pt = tmp_path / "local" / "sae.pt"
    torch.save(openai_state(), pt)
    cache = tmp_path / "hub"
    sha = _hub_snapshot(cache, "someone/saes", {"blocks.1.hook_resid_post": local, "openai/3.pt": pt})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    x = inputs(D)
    for source, kw in [("hf://someone/saes/blocks.1.hook_resid_post", {}),
                       ("someone/saes", {"subfolder": "blocks.1.hook_resid_post"}),
                       ("hf://someone/saes", {"subfolder": "blocks.1.hook_resid_post", "revision": sha})]:
        loaded = load_sae(source, **kw)
        torch.testing.assert_close(loaded.reconstruct(x), ours.reconstruct(x))
        assert loaded.export_cfg["source"] == source
    state = openai_state()
    assert_same_outputs(load_sae("hf://someone/saes/openai/3.pt"), x, *openai_forward(state, x))
    with pytest.raises(FileNotFoundError, match="hf://someone/other"):
        load_sae("hf://someone/other")
    with pytest.raises(FileNotFoundError, match="no 'nope'"):
        load_sae("hf://someone/saes/nope")


def test_norm_scaling_factor_only_where_it_applies(tmp_path):
    out = export_sae(TopKSAE(D, N, k=K), tmp_path / "sae")
    with pytest.raises(ValueError, match="expected_average_only_in"):
        load_sae(out, norm_scaling_factor=2.0)


class DenseCodesSAE:
    """Another library's style: encode -> dense [B, n] codes, decode(codes) -> raw activations."""

    def __init__(self):
        self.W = _rand(N, D, seed=9) / 4
        self.d_sae = N

    def encode(self, x):
        return (x @ self.W.T - 0.5).relu()

    def decode(self, z):
        return z @ self.W + 1.0


def test_the_eval_adapter_takes_dense_code_apis():
    from sae_lit.evals.adapter import as_adapter, densify

    sae, x = DenseCodesSAE(), inputs(D)
    adapter = as_adapter(sae)
    assert adapter.dense_codes_api and not adapter.ours
    torch.testing.assert_close(densify(*adapter.encode(x), N), sae.encode(x))
    torch.testing.assert_close(adapter.reconstruct(x), sae.decode(sae.encode(x)))
    v, i = adapter.encode(x)
    dirs = adapter.decoder_directions(x, i)
    torch.testing.assert_close(dirs, sae.W[i])
