"""Binary probing tasks with real labels from the embedded corpora (PAPER.md "Probe loss"; the
paper uses 61 tasks of its own, these are ours).

A task is a set of labelled *events* on text snippets: (char_start, char_end, label). The probe
reads the hookpoint activation at the last LM token overlapping the event, so labels are
tokenizer-independent and one snippet (one model forward) serves every task that labels it.

Sources and tasks (``TASKS`` lists them with one line each):
  stdlib code   Python token categories from the standard ``tokenize`` and ``ast`` modules
  pydoc_data    prose about Python, with indented code examples
  KJV Bible     Old vs New Testament, seven genres, verse structure
  VADER lexicon word sentiment, if the ``vaderSentiment`` package is installed
  user JSONL    {"text": ..., "label": 0|1, "span": [start, end]} (char offsets; default: the
                last token of the text), one file per task, the task named after the file
"""
from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import logging
import random
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

Event = tuple[int, int, int]  # (char_start, char_end, label)


@dataclass
class Snippet:
    text: str
    source: str  # "code", "pydoc", "kjv" or "user"
    events: dict[str, list[Event]] = field(default_factory=dict)


GENRES = {
    "law": ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"],
    "history": ["Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
                "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Acts"],
    "poetry": ["Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"],
    "prophets": ["Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
                 "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi"],
    "gospels": ["Matthew", "Mark", "Luke", "John"],
    "epistles": ["Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
                 "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews",
                 "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude"],
    "apocalyptic": ["Revelation"],
}
NEW_TESTAMENT_FROM = "Matthew"
DEITY = {"LORD", "GOD", "God", "Lord", "Jesus", "Christ", "Ghost", "Spirit"}

TASKS = {
    "py_keyword": "Python keyword (tokenize NAME + keyword.iskeyword) vs other code tokens",
    "py_identifier": "user identifier (NAME, not keyword or builtin) vs other code tokens",
    "py_builtin": "builtin name (dir(builtins)) vs other code tokens",
    "py_string": "string literal (not a docstring) vs other code tokens",
    "py_docstring": "docstring (ast: first statement of module/class/def) vs other code tokens",
    "py_comment": "comment vs other code tokens",
    "py_number": "number literal vs other code tokens",
    "py_operator": "operator / punctuation (tokenize OP) vs other code tokens",
    "py_open_bracket": "( [ { vs other code tokens",
    "py_attribute": "name after '.' vs other names",
    "py_def_name": "name after def/class vs other names",
    "py_self": "'self' vs other names",
    "py_import_line": "token on an import line vs other code tokens",
    "py_def_line": "token on a def/class line vs other code tokens",
    "py_line_start": "first token of a logical line vs other code tokens",
    "py_deep_indent": "token on a line indented >= 8 columns vs shallower lines",
    "code_vs_prose": "stdlib code vs prose (pydoc, KJV), at every word past the first quarter of a snippet",
    "docs_vs_bible": "pydoc prose vs KJV",
    "kjv_new_testament": "KJV New vs Old Testament",
    **{f"kjv_genre_{g}": f"KJV {g} books vs the other genres" for g in GENRES},
    "kjv_verse_number": "verse number at a line start vs other KJV tokens",
    "kjv_verse_start": "first word of a verse vs other KJV words",
    "kjv_deity": "divine name (LORD, God, Jesus, ...) vs other KJV words",
    "prose_sentence_start": "first word of a sentence vs other words (pydoc, KJV)",
    "prose_capitalized": "capitalised word inside a sentence vs lowercase words",
    "prose_punctuation": ". , ; : ! ? vs words",
    "pydoc_code_example": "token in an indented code example vs prose lines of pydoc",
    "vader_positive": "word with VADER valence >= 1 vs neutral words (needs vaderSentiment)",
    "vader_negative": "word with VADER valence <= -1 vs neutral words (needs vaderSentiment)",
    "vader_polarity": "positive vs negative VADER words (needs vaderSentiment)",
}


# --- snippets --------------------------------------------------------------------------------


def _cut(text: str, tokenizer, max_tokens: int) -> str:
    """The longest prefix of `text` that is at most max_tokens LM tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    return text if len(offs) <= max_tokens else text[: offs[max_tokens - 1][1]]


def _chunk_lines(text: str, rng: random.Random, max_chars: int) -> tuple[int, int]:
    """A random run of whole lines of about max_chars: (char_start, char_end)."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    first = rng.randrange(max(1, len(starts) - 4))
    a = starts[first]
    b = a
    for s in starts[first + 1 :]:
        b = s
        if b - a >= max_chars:
            break
    else:
        b = len(text)
    return a, b


def _python_tokens(source: str):
    """(start, end, type, string, first_on_line, line_first_string, line_indent) per significant
    token, with char offsets; None if the file does not tokenize/parse on this Python."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
        tree = ast.parse(source)
    except (tokenize.TokenError, SyntaxError, IndentationError, ValueError):
        return None
    line_off = [0] + [m.end() for m in re.finditer("\n", source)]
    doc_ranges = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc_ranges.add(line_off[first.lineno - 1] + first.col_offset)
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    out, line_first, new_logical = [], None, True
    for t in toks:
        if t.type in skip:
            new_logical = new_logical or t.type == tokenize.NEWLINE
            continue
        s = line_off[t.start[0] - 1] + t.start[1]
        e = line_off[t.end[0] - 1] + t.end[1]
        if new_logical:
            line_first, indent = t.string, t.start[1]
        out.append((s, e, t, new_logical, line_first, indent, s in doc_ranges))
        new_logical = False
    return out


def _code_events(tokens, source: str, a: int, b: int) -> dict[str, list[Event]]:
    ev: dict[str, list[Event]] = {name: [] for name in TASKS if name.startswith("py_")}
    builtin_names = set(dir(builtins))
    prev = None
    for s, e, t, first, line_first, indent, is_doc in tokens:
        string_like = t.type == tokenize.STRING or t.type in _FSTRING_TYPES
        is_comment = t.type == tokenize.COMMENT
        if (string_like or is_comment) and s < b and e > a:
            # Long tokens (docstrings, comments) give one event per word inside the snippet;
            # a single event at the token's end would be lost whenever the snippet cuts it.
            kind = {"py_string": string_like and not is_doc, "py_docstring": string_like and is_doc, "py_comment": is_comment}
            lo, hi = max(s, a), min(e, b)
            for m in re.finditer(r"\S+", source[lo:hi]):
                for name in _CATEGORY_TASKS:
                    ev[name].append((lo - a + m.start(), lo - a + m.end(), int(kind.get(name, False))))
        elif a <= s and e <= b:
            rel = (s - a, e - a)
            is_name = t.type == tokenize.NAME
            is_kw = is_name and keyword.iskeyword(t.string)
            labels = {
                "py_keyword": is_kw,
                "py_identifier": is_name and not is_kw and t.string not in builtin_names,
                "py_builtin": is_name and not is_kw and t.string in builtin_names,
                "py_string": string_like and not is_doc,
                "py_docstring": string_like and is_doc,
                "py_comment": t.type == tokenize.COMMENT,
                "py_number": t.type == tokenize.NUMBER,
                "py_operator": t.type == tokenize.OP,
                "py_open_bracket": t.type == tokenize.OP and t.string in "([{",
                "py_import_line": line_first in ("import", "from"),
                "py_def_line": line_first in ("def", "class", "async"),
                "py_line_start": first,
                "py_deep_indent": indent >= 8,
            }
            for name, lab in labels.items():
                ev[name].append((*rel, int(lab)))
            if is_name and not is_kw:
                after = prev.string if prev is not None else ""
                ev["py_attribute"].append((*rel, int(after == ".")))
                ev["py_def_name"].append((*rel, int(after in ("def", "class"))))
                ev["py_self"].append((*rel, int(t.string == "self")))
        prev = t
    return ev


# Tasks over all code tokens by category; words inside strings and comments are negatives of
# every category but their own. (Line and name tasks skip those words.)
_CATEGORY_TASKS = ("py_keyword", "py_identifier", "py_builtin", "py_string", "py_docstring", "py_comment",
                   "py_number", "py_operator", "py_open_bracket", "py_line_start")
_FSTRING_TYPES = {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)}
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def _context_events(text: str, label: int, start: float = 0.25) -> list[Event]:
    """Document-level labels read at the end of every word past the first quarter of the snippet
    (enough context before each), so one snippet (one LM forward) gives many examples: what
    limits these tasks is LM tokens, and the probe splits by snippet, never inside one."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return [(e - 1, e, label) for e in ends[int(start * len(ends)):]]


def _prose_events(text: str, source: str, vader: dict | None) -> dict[str, list[Event]]:
    ev: dict[str, list[Event]] = {}

    def add(name, s, e, lab):
        ev.setdefault(name, []).append((s, e, int(lab)))

    for m in _WORD.finditer(text):
        s, e, w = m.start(), m.end(), m.group()
        if s < 8:
            continue  # too little context before it
        before = text[:s].rstrip(" ")
        line_start = before.endswith("\n") or before == ""
        verse_start = source == "kjv" and re.search(r"(^|\n)\d+ $", text[:s]) is not None
        sentence_start = before[-1:] in (".", "!", "?") or verse_start
        add("prose_sentence_start", s, e, sentence_start)
        if not (sentence_start or line_start):
            add("prose_capitalized", s, e, w[0].isupper())
        add("prose_punctuation", s, e, 0)
        if source == "kjv":
            add("kjv_verse_start", s, e, verse_start)
            add("kjv_verse_number", s, e, 0)
            add("kjv_deity", s, e, w in DEITY)
        if vader is not None:
            v = vader.get(w.lower())
            if v is None or abs(v) < 0.5:
                add("vader_positive", s, e, 0)
                add("vader_negative", s, e, 0)
            elif v >= 1:
                add("vader_positive", s, e, 1)
                add("vader_polarity", s, e, 1)
            elif v <= -1:
                add("vader_negative", s, e, 1)
                add("vader_polarity", s, e, 0)
    for m in re.finditer(r"[.,;:!?]", text):
        if m.start() >= 8:
            add("prose_punctuation", m.start(), m.end(), 1)
    if source == "kjv":
        for m in re.finditer(r"(?m)^\d+(?= )", text):
            if m.start() >= 8:
                add("kjv_verse_number", m.start(), m.end(), 1)
    if source == "pydoc":
        for m in re.finditer(r"(?m)^( *)(.*)$", text):
            if not m.group(2).strip():
                continue
            code = len(m.group(1)) >= 3
            for t in re.finditer(r"\S+", m.group(2)):
                s = m.start(2) + t.start()
                if s >= 8:
                    add("pydoc_code_example", s, s + len(t.group()), code)
    return ev


def vader_lexicon() -> dict[str, float] | None:
    """The VADER word -> valence lexicon, or None (with a note) without the package."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        log.info("probes: vaderSentiment is not installed; the vader_* tasks are skipped (pip install vaderSentiment).")
        return None
    return {w: float(v) for w, v in SentimentIntensityAnalyzer().lexicon.items() if w.isalpha()}


def _kjv_chapters() -> list[tuple[str, list[str]]]:
    from sae_lit.data.corpus import _kjv_file

    chapters: dict[tuple[str, int], list[str]] = {}
    with open(_kjv_file(), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(f"{v['verse']} {v['text']}")
    return [(book, verses) for (book, _), verses in chapters.items()]


def builtin_snippets(tokenizer, n_code: int = 96, n_pydoc: int = 48, n_kjv_per_genre: int = 24,
                     max_tokens: int = 64, seed: int = 0) -> list[Snippet]:
    """Snippets of at most max_tokens LM tokens from the embedded corpora, every task's events
    attached. Deterministic for a seed. Documents come from both of the corpus's splits:
    probes ask what the latents encode; the probe fit and its score use disjoint snippets."""
    rng = random.Random(seed)
    max_chars = max_tokens * 6  # generous: _cut trims to the token budget
    vader = vader_lexicon()
    out: list[Snippet] = []

    from sae_lit.data.corpus import _stdlib_files

    files = list(_stdlib_files())
    rng.shuffle(files)
    for _, path in files:
        if sum(s.source == "code" for s in out) >= n_code:
            break
        source = path.read_text(encoding="utf-8", errors="replace")
        toks = _python_tokens(source)
        if not toks:
            continue
        a, b = _chunk_lines(source, rng, max_chars)
        text = _cut(source[a:b], tokenizer, max_tokens)
        if len(text) < 40:
            continue
        events = _code_events(toks, source, a, a + len(text))
        events["code_vs_prose"] = _context_events(text, 1)
        out.append(Snippet(text, "code", events))

    from pydoc_data.topics import topics

    names = sorted(topics)
    for i in range(n_pydoc):
        doc = topics[names[rng.randrange(len(names))]]
        a, b = _chunk_lines(doc, rng, max_chars)
        text = _cut(doc[a:b], tokenizer, max_tokens)
        if len(text) < 40:
            continue
        events = _prose_events(text, "pydoc", vader)
        events["code_vs_prose"] = _context_events(text, 0)
        events["docs_vs_bible"] = _context_events(text, 1)
        out.append(Snippet(text, "pydoc", events))

    chapters = _kjv_chapters()
    nt_start = next(i for i, (book, _) in enumerate(chapters) if book == NEW_TESTAMENT_FROM)
    genre_of = {book: g for g, books in GENRES.items() for book in books}
    for genre in GENRES:
        pool = [(i, c) for i, c in enumerate(chapters) if genre_of[c[0]] == genre]
        for _ in range(n_kjv_per_genre):
            i, (book, verses) = pool[rng.randrange(len(pool))]
            v0 = rng.randrange(max(1, len(verses) - 3))
            text = _cut("\n".join(verses[v0:]), tokenizer, max_tokens)
            events = _prose_events(text, "kjv", vader)
            events["code_vs_prose"] = _context_events(text, 0)
            events["docs_vs_bible"] = _context_events(text, 0)
            events["kjv_new_testament"] = _context_events(text, int(i >= nt_start))
            for g in GENRES:
                events[f"kjv_genre_{g}"] = _context_events(text, int(g == genre))
            out.append(Snippet(text, "kjv", events))
    return out


def load_jsonl_task(path: str | Path) -> tuple[str, list[Snippet]]:
    """A user task: one JSON object a line, {"text": str, "label": 0|1, "span": [start, end]}
    (span optional, char offsets into text; the probe reads the last token overlapping it,
    or the text's last token without one). The task is named after the file."""
    path = Path(path)
    name = f"user_{path.stem}"
    snippets = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], int(row["label"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path} line {n}: expected {{\"text\": str, \"label\": 0|1, \"span\": [start, end]}} ({e})") from None
            if label not in (0, 1):
                raise ValueError(f"{path} line {n}: label must be 0 or 1, got {row['label']!r}")
            s, e = row.get("span") or (max(len(text.rstrip()) - 1, 0), len(text.rstrip()))
            if not 0 <= s < e <= len(text):
                raise ValueError(f"{path} line {n}: span {[s, e]} is outside the text (length {len(text)})")
            snippets.append(Snippet(text, "user", {name: [(s, e, label)]}))
    if not snippets:
        raise ValueError(f"{path}: no examples")
    return name, snippets
