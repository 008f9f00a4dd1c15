import itertools
import json

import numpy as np
import pytest

from sae_lit.data import corpus as C
from sae_lit.data.subject import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_split_is_by_document_and_deterministic(tiny_corpus):
    corpus = C.make_corpus(tiny_corpus, val_fraction=0.25)
    train = [d.id for d in corpus.documents("train")]
    val = [d.id for d in corpus.documents("val")]
    assert not set(train) & set(val) and len(train) + len(val) == 120
    assert 15 < len(val) < 45  # about a quarter
    assert val == [d.id for d in C.make_corpus(tiny_corpus, val_fraction=0.25).documents("val")]
    # The split depends on the id alone, not on position or on the other documents.
    assert all(C.split_of(i, 0.25) == "val" for i in val)
    assert [d.id for d in C.make_corpus(tiny_corpus, 0.25, seed=1).documents("val")] != val


def test_packing(tokenizer):
    docs = [C.Document(f"d{i}", "s", text) for i, text in enumerate(["alpha beta " * 9, "gamma", "delta epsilon " * 20])]
    T = 16
    contexts = list(C.pack_contexts(docs, tokenizer, T))
    bos, sep = C.special_ids(tokenizer)
    assert all(c.tokens.shape == (T,) and c.tokens.dtype == np.int32 and c.tokens[0] == bos for c in contexts)
    stream = []
    for d in docs:
        stream += tokenizer(d.text, add_special_tokens=False)["input_ids"] + [sep]
    bodies = np.concatenate([c.tokens[1:] for c in contexts])
    assert len(bodies) == len(stream) // (T - 1) * (T - 1)  # the partial tail is dropped
    np.testing.assert_array_equal(bodies, stream[: len(bodies)])
    # Each context lists the documents it shows, with where they sit in the document and the block.
    for c in contexts:
        for d in c.docs:
            doc_tokens = tokenizer(docs[int(d["id"][1:])].text, add_special_tokens=False)["input_ids"] + [sep]
            n = min(T - d["pos"], len(doc_tokens) - d["offset"])
            np.testing.assert_array_equal(c.tokens[d["pos"] : d["pos"] + n], doc_tokens[d["offset"] : d["offset"] + n])
    assert [d["id"] for d in contexts[0].docs] == ["d0"]
    assert any(len(c.docs) == 3 for c in contexts) or any(len(c.docs) == 2 for c in contexts)


def test_txt_files_are_cut_into_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "TXT_DOC_CHARS", 200)
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of a long text\n" for i in range(100)))
    corpus = C.make_corpus(str(path), val_fraction=0.3)
    docs = list(corpus.documents("train")) + list(corpus.documents("val"))
    assert len(docs) > 5 and {d.source for d in docs} == {"book.txt"}
    assert sorted(len(d.text) for d in docs)[-1] < 250
    assert "".join(d.text for d in sorted(docs, key=lambda d: int(d.id.split("#")[1]))) == path.read_text()


def test_folders_and_fingerprints(tmp_path, tiny_corpus):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "more"}) + "\n")
    corpus = C.make_corpus(str(tmp_path), val_fraction=0.0)
    assert [d.text for d in corpus.documents("train")] == ["some text\n", "more"]
    fp = corpus.fingerprint()
    assert fp == C.make_corpus(str(tmp_path), val_fraction=0.0).fingerprint()
    assert fp != C.make_corpus(str(tmp_path), val_fraction=0.1).fingerprint()
    (tmp_path / "a.txt").write_text("other text\n")
    assert fp != C.make_corpus(str(tmp_path), val_fraction=0.0).fingerprint()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        C.make_corpus(str(tmp_path / "nope.txt"))
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(KeyError, match="text_field"):
        list(C.make_corpus(str(bad), val_fraction=0.0).documents("train"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["first", "second"]}), tmp_path / "t.parquet")
    docs = list(C.make_corpus(str(tmp_path / "t.parquet"), val_fraction=0.0).documents("train"))
    assert [(d.id, d.text) for d in docs] == [("t.parquet:a", "first"), ("t.parquet:b", "second")]


def test_hf_spec_parsing():
    c = C.make_corpus("hf:allenai/c4:en@validation")
    assert (c.name, c.config, c.hf_split) == ("allenai/c4", "en", "validation")
    c = C.make_corpus("hf:roneneldan/TinyStories")
    assert (c.name, c.config, c.hf_split) == ("roneneldan/TinyStories", None, "train")


def test_embedded_corpus_mixes_three_real_sources():
    corpus = C.make_corpus("embedded")
    head = list(itertools.islice(corpus.documents("train"), 40))
    assert {d.source for d in head} == {"kjv", "stdlib", "pydoc"}
    assert len({d.id for d in head}) == 40 and all(d.text for d in head)
    val_head = {d.id for d in itertools.islice(corpus.documents("val"), 20)}
    assert not val_head & {d.id for d in head}
    assert all(C.split_of(i, 0.05) == "val" for i in val_head)
    assert corpus.fingerprint() == C.make_corpus("embedded").fingerprint()
    kjv = next(d for d in head if d.source == "kjv")
    assert kjv.id.startswith("kjv/") and kjv.text.split("\n")[1].startswith("1 ")  # a chapter from verse 1
