"""Tiny subject models and corpora for the data-side tests: built offline from a transformers
config and a tokenizer trained on a few strings, saved as a local folder so the real
`from_pretrained` path is exercised."""
from __future__ import annotations

import json
import random

import pytest
import torch

WORDS = (
    "the of and to in is was that for it with as his on be at by he this had not are but from or "
    "have an they which one you were her all she there would their we him been has when who will "
    "def return import class self if else while yield lambda None True False print range len"
).split()


def make_texts(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n_docs)]


def build_tiny_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def build_tiny_model(vocab_size: int, n_layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer(make_texts(200, seed=1))
    model = build_tiny_model(len(tokenizer))
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A .jsonl corpus of 120 short documents (about 10k tokens with the tiny tokenizer)."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i, text in enumerate(make_texts(120, seed=2)):
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return str(path)


def tiny_cache_kwargs(cache_dir, model_dir, corpus) -> dict:
    """Small CacheConfig / ActivationDataModule arguments: 16-token contexts, 8 blocks a shard,
    5 train shards and 2 val shards."""
    return dict(
        cache_dir=str(cache_dir),
        model=model_dir,
        hookpoint="resid_post.1",
        corpus=corpus,
        context_length=16,
        train_tokens=16 * 40,
        val_tokens=16 * 12,
        tokens_per_shard=16 * 8,
        model_batch_size=4,
        device="cpu",
        val_fraction=0.25,
        sample_tokens=256,
        subject_dtype="float32",  # "auto" measures the machine; tests want one answer
    )


@pytest.fixture
def cache_kwargs(tmp_path, tiny_model_dir, tiny_corpus):
    return tiny_cache_kwargs(tmp_path / "cache", tiny_model_dir, tiny_corpus)


def make_datamodule(cache_kwargs: dict, **kw):
    """ActivationDataModule from flat keyword arguments: CacheConfig fields go into its
    ``cache``, the rest to the data module."""
    import dataclasses

    from sae_lit.data.cache import CacheConfig
    from sae_lit.data.datamodule import ActivationDataModule

    names = {f.name for f in dataclasses.fields(CacheConfig)}
    args = {**cache_kwargs, **kw}
    cache = CacheConfig(**{k: v for k, v in args.items() if k in names})
    return ActivationDataModule(cache, **{k: v for k, v in args.items() if k not in names})


def sae_module(**kw):
    """SAEModule from flat keyword arguments: SAEConfig fields go into its ``sae``."""
    import dataclasses

    from sae_lit.model.sae import SAEConfig
    from sae_lit.training.module import SAEModule

    names = {f.name for f in dataclasses.fields(SAEConfig)}
    return SAEModule(SAEConfig(**{k: v for k, v in kw.items() if k in names}),
                     **{k: v for k, v in kw.items() if k not in names})
