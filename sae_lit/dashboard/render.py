"""HTML for the dashboard: the index (table data as JSON, rendered by a small inline script) and
one static page per latent (contexts, samples, histogram as inline SVG, logits, N2G).

Token text is HTML-escaped once per token id; whitespace is made visible (newline ↵, tab ⇥,
spaces as · where a token stands alone)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from sae_lit.dashboard.assets import INDEX_JS, STYLE
from sae_lit.dashboard.stats import HIST_PER_OCTAVE, LOG2_LO, NUM_BANDS
from sae_lit.common import fmt
from sae_lit.dashboard.svg import density_svg, histogram_svg

_CONTROL = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(text: str, spaces: bool = False) -> str:
    """Escaped HTML for a token's text; control characters as glyphs (and spaces as · if asked)."""
    out = []
    for ch in text:
        if ch in _CONTROL:
            out.append(f"<i>{_CONTROL[ch]}</i>")
        elif spaces and ch == " ":
            out.append("<i>·</i>")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"<i>\\x{ord(ch):02x}</i>")
        else:
            out.append(html.escape(ch, quote=True))
    return "".join(out)


def plain(text: str) -> str:
    """A token as plain text for the index table and tooltips (whitespace as glyphs)."""
    return "".join(_CONTROL.get(ch, "·" if ch == " " else ch if ord(ch) >= 32 else f"\\x{ord(ch):02x}") for ch in text)


def pct(x: float) -> str:
    if x <= 0:
        return "0"
    p = 100 * x
    return f"{p:.1f}%" if p >= 1 else f"{p:.3f}%" if p >= 0.01 else f"{p:.1e}%"


class Tokens:
    """Display strings per token id, computed once."""

    def __init__(self, decode, special_ids=frozenset()):
        self.decode, self.special = decode, set(special_ids)
        self._html, self._plain = {}, {}

    def text(self, tok: int) -> str:
        if self.decode is None:
            return f"<{tok}>"
        try:
            return self.decode(int(tok))
        except Exception:  # an id the tokenizer cannot decode (e.g. a padded vocabulary)
            return f"<{tok}>"

    def html(self, tok: int) -> str:
        s = self._html.get(tok)
        if s is None:
            t = self.text(tok)
            s = f'<span class="sp">{html.escape(t)}</span>' if tok in self.special else visible(t)
            self._html[tok] = s
        return s

    def chip(self, tok: int) -> str:
        return f'<span class="tok">{visible(self.text(tok), spaces=True)}</span>'

    def plain(self, tok: int) -> str:
        s = self._plain.get(tok)
        if s is None:
            s = self._plain[tok] = plain(self.text(tok))
        return s


# --- pieces ------------------------------------------------------------------------------------


def context_html(tokens: np.ndarray, T: int, tok_id: int, window: np.ndarray, left: int, scale: float,
                 value: float, source: str, names: Tokens) -> str:
    """One context: the window of the block around the token, each firing token shaded by its
    activation / ``scale`` with the value as tooltip; the centre token outlined."""
    b, p = divmod(int(tok_id), T)
    lo, hi = max(0, p - left), min(T, p - left + len(window))
    parts = []
    cache = names._html
    acts = window[lo - p + left : hi - p + left].tolist()
    for t, tok, a in zip(range(lo, hi), tokens[b, lo:hi].tolist(), acts):
        text = cache.get(tok) or names.html(tok)
        if a != a:  # NaN
            parts.append(f'<span class=x>{text}</span>')
        elif a > 0:
            # unquoted attributes: these spans are most of a page's bytes
            alpha = 0.12 + 0.88 * min(a / scale, 1.0) if scale > 0 else 1.0
            cls = '"a m"' if t == p else "a"
            parts.append(f"<span class={cls} style=--a:{alpha:.2f} title={fmt(a, 3)}>{text}</span>")
        else:
            parts.append(text)
    doc, where = source
    return (f'<div class="ctx"><span class="v">{fmt(value, 3)}</span><span class="src" title="{html.escape(doc)} · {where}">'
            f'{html.escape(doc)}</span><span class="txt">{"".join(parts)}</span></div>')


def source_label(blocks: list[dict], tok_id: int, T: int) -> tuple[str, str]:
    """(document id, "block b, token p") of a token, from the blocks' meta.json."""
    b, p = divmod(int(tok_id), T)
    info = blocks[b]
    doc = ""
    for d in info["docs"]:
        if d.get("pos", 0) <= p:
            doc = str(d.get("id") or "")
    return doc, f"block {info['index']}, token {p}"


def n2g_html(ex: dict, names: Tokens) -> str:
    pats = []
    for pattern in ex.get("patterns", []):
        chips = "".join(
            '<span class="tok">*</span>' if t == "*" else f'<span class="tok">{visible(str(t), spaces=True)}</span>' for t in pattern
        )
        pats.append(f'<div class="pat">{chips}</div>')
    p, r, f1 = ex.get("precision"), ex.get("recall"), ex.get("f1")
    stats = (f"precision {fmt(p, 2)} · recall {fmt(r, 2)} · F1 {fmt(f1, 2)} "
             f'<span class="muted">({ex.get("predicted", "?")} predicted, {ex.get("fired", "?")} fired on held-out text)</span>')
    return (f'<section class="n2g"><h2 style="margin-top:4px">N2G explanation</h2><p style="margin:0 0 6px">{stats}</p>'
            f'<p class="muted" style="margin:0 0 4px">Fires where the text ends with one of these token patterns '
            f"(* = any token):</p>{''.join(pats)}</section>")


def n2g_text(ex: dict | None) -> list[str]:
    """An explanation's first patterns as plain strings, for the index."""
    if not ex:
        return []
    return ["".join(plain(str(t)) for t in pattern) for pattern in ex.get("patterns", [])[:6]]


# --- pages -------------------------------------------------------------------------------------


def _page(title: str, body: str, css: str = "style.css") -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><link rel=\"stylesheet\" href=\"{css}\"></head>\n"
            f"<body><main>\n{body}\n</main></body></html>\n")


def latent_page(data, j: int, names: Tokens) -> str:
    st = data.stats
    T, left = st.T, st.left
    count = int(st.count[j])
    n = st.num_latents
    density = count / max(st.tokens_scored, 1)
    mx = float(st.max[j])
    mean = float(st.sum[j]) / count if count else float("nan")
    nav = ['<a href="../index.html">all latents</a>']
    if j > 0:
        nav.append(f'<a href="{j - 1}.html">← {j - 1}</a>')
    if j < n - 1:
        nav.append(f'<a href="{j + 1}.html">{j + 1} →</a>')
    out = [f'<header class="top"><h1>Latent {j}</h1><span class="sub">{html.escape(data.info.get("title", ""))}</span>'
           f'<nav>{" ".join(nav)}</nav></header>']
    out.append(
        '<div class="cards">'
        f'<div class="card"><b>{pct(density)}</b><span>density ({count:,} of {st.tokens_scored:,} tokens)</span></div>'
        f'<div class="card"><b>{fmt(mx, 3)}</b><span>max activation</span></div>'
        f'<div class="card"><b>{fmt(mean, 3)}</b><span>mean when firing</span></div></div>'
    )
    ex = data.n2g.get(j)
    if ex:
        out.append(n2g_html(ex, names))
    left_col = f"<section><h2>Activation histogram</h2>{histogram_svg(st.hist[j].numpy(), f'latent {j} activation histogram')}</section>"
    right_col = ""
    if data.logits is not None:
        rows = []
        lg = data.logits
        for i in range(lg["top_ids"].shape[1]):
            rows.append(
                f'<tr><td>{names.chip(int(lg["top_ids"][j, i]))}</td><td class="num">{float(lg["top_values"][j, i]):+.3f}</td>'
                f'<td>{names.chip(int(lg["bottom_ids"][j, i]))}</td><td class="num">{float(lg["bottom_values"][j, i]):+.3f}</td></tr>'
            )
        right_col = ('<section><h2>Logit effect <span class="muted" style="font-weight:normal;font-size:12px">'
                     "(W_dec · W_U, direct path)</span></h2><table class=\"logits\"><tr><th>promotes</th><th></th>"
                     f'<th>suppresses</th><th></th></tr>{"".join(rows)}</table></section>')
    out.append(f'<div class="grid2">{left_col}{right_col}</div>')

    if count == 0:
        out.append(f'<p class="muted">This latent never fired on the {st.tokens_scored:,} scored tokens.</p>')
    else:
        ctx, shown, folded = [], [], 0
        keys, toks, wins = st.top.keys[j].tolist(), st.top.fields["token"][j].tolist(), st.top.fields["window"][j].float().numpy()
        for s, tid in enumerate(toks):
            if tid < 0:
                break
            # A firing inside the window of a stronger one shown above is already visible there
            # (the next token of the same word, typically): fold it into that row.
            if any(b == tid // T and -left <= tid % T - p <= st.right for b, p in shown):
                folded += 1
                continue
            shown.append(divmod(tid, T))
            ctx.append(context_html(data.tokens, T, tid, wins[s], left, mx, keys[s], source_label(data.blocks, tid, T), names))
        note = f' <span class="muted" style="font-weight:normal;font-size:12px">({folded} more within the rows shown)</span>' if folded else ""
        out.append(f'<h2>Top activations{note}</h2><div class="ctxs">{"".join(ctx)}</div>')
        out.append(_bands_html(data, j, mx, names))
    out.append('<p class="legend">Shading: activation relative to this latent\'s maximum (hover a token for its value); '
               "the outlined token is the one the row is about. Grey tokens were not scored (BOS, outliers). "
               "↵ newline, ⇥ tab.</p>")
    return _page(f"Latent {j}", "\n".join(out), css="../style.css")


def _bands_html(data, j: int, mx: float, names: Tokens) -> str:
    st = data.stats
    counts = st.hist[j].view(NUM_BANDS, HIST_PER_OCTAVE).sum(-1)
    total = int(counts.sum())
    shown = [b for b in range(NUM_BANDS - 1, -1, -1) if counts[b] > 0][: data.info.get("bands_shown", 5)]
    parts = []
    S = st.samples.size
    for b in shown:
        g = j * NUM_BANDS + b
        toks = st.samples.fields["token"][g]
        vals = st.samples.fields["value"][g]
        wins = st.samples.fields["window"][g].float().numpy()
        order = sorted((s for s in range(S) if toks[s] >= 0), key=lambda s: -float(vals[s]))
        lo, hi = 2.0 ** (b + LOG2_LO), 2.0 ** (b + LOG2_LO + 1)
        lo_s = "0" if b == 0 else fmt(lo, 3)
        hi_s = "∞" if b == NUM_BANDS - 1 else fmt(hi, 3)
        rows = "".join(
            context_html(data.tokens, st.T, int(toks[s]), wins[s], st.left, mx, float(vals[s]),
                         source_label(data.blocks, int(toks[s]), st.T), names)
            for s in order
        )
        parts.append(f'<div class="band"><h3>{lo_s} – {hi_s} <span class="muted">· {int(counts[b]):,} firings '
                     f"({100 * int(counts[b]) / total:.1f}%), {len(order)} shown</span></h3>"
                     f'<div class="ctxs">{rows}</div></div>')
    return (f'<h2>Random samples by activation band</h2><p class="muted" style="margin:0">Uniform samples of the firings '
            f"within each octave of activation value, strongest band first.</p>{''.join(parts)}")


def index_rows(data, names: Tokens) -> tuple[list[str], list[list]]:
    st = data.stats
    columns = ["id", "density", "max", "mean", "top_tokens", "logits", "n2g", "precision", "recall"]
    rows = []
    count = st.count.tolist()
    mx = st.max.tolist()
    sums = st.sum.tolist()
    top_tok = st.top.fields["token"][:, : min(5, st.top.size)]
    T = st.T
    for j in range(st.num_latents):
        c = count[j]
        seen = []
        for t in top_tok[j].tolist():
            if t < 0:
                break
            s = names.plain(int(data.tokens[t // T, t % T]))
            if s not in seen:
                seen.append(s)
        logits = []
        if data.logits is not None:
            logits = [names.plain(int(i)) for i in data.logits["top_ids"][j, :4].tolist()]
        ex = data.n2g.get(j)
        rows.append([
            j, c / max(st.tokens_scored, 1), round(mx[j], 4) if c else None, round(sums[j] / c, 4) if c else None,
            seen, logits, n2g_text(ex), _num((ex or {}).get("precision")), _num((ex or {}).get("recall")),
        ])
    return columns, rows


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def index_page(data, names: Tokens) -> str:
    st = data.stats
    columns, rows = index_rows(data, names)
    density = (st.count.double() / max(st.tokens_scored, 1)).numpy()
    dead = int((st.count == 0).sum())
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in data.info.get("facts", {}).items())
    alive = density[density > 0]
    summary = (
        f'<div class="cards"><div class="card"><b>{st.num_latents:,}</b><span>latents</span></div>'
        f'<div class="card"><b>{st.tokens_scored:,}</b><span>tokens scored</span></div>'
        f'<div class="card"><b>{dead:,}</b><span>never fired{f" ({pct(dead / st.num_latents)})" if dead else ""}</span></div>'
        f'<div class="card"><b>{pct(float(np.median(alive))) if alive.size else "–"}</b><span>median density (fired)</span></div>'
        f'<div class="card"><b>{len(data.n2g):,}</b><span>N2G explanations</span></div></div>'
    )
    head = [("id", "Latent"), ("density", "Density"), ("max", "Max act."), ("mean", "Mean act."),
            ("top_tokens", "Top-activating tokens"), ("logits", "Top logits"), ("n2g", "N2G explanation"),
            ("precision", "P"), ("recall", "R")]
    ths = "".join(f'<th data-k="{k}">{html.escape(label)}</th>' for k, label in head)
    payload = json.dumps({"columns": columns, "rows": rows}, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c")  # no "</script>" or "<!--" inside the script element
    body = f"""<header class="top"><h1>Latent dashboard</h1><span class="sub">{html.escape(data.info.get("title", ""))}</span></header>
{summary}
<div class="summary"><dl class="facts">{facts}</dl><section><h2 style="margin-top:6px">Latent density</h2>{density_svg(density)}</section></div>
<div class="controls"><input id="q" type="search" placeholder="Search token text, logits, explanations or a latent id" aria-label="search" autocomplete="off">
<select id="filter" aria-label="filter"><option value="all">all latents</option><option value="alive">fired</option>
<option value="dead">never fired</option><option value="n2g">with N2G explanation</option></select>
<button id="prev" type="button">← prev</button><button id="next" type="button">next →</button><span id="count" class="muted"></span></div>
<table id="latents" class="latents"><thead><tr>{ths}</tr></thead><tbody></tbody></table>
<p class="legend">Density: fraction of scored tokens on which the latent fires. Top-activating tokens: the tokens of its strongest
activations. Top logits: the tokens its decoder direction promotes most through the unembedding. Click a header to sort.</p>
<script id="data" type="application/json">{payload}</script>
<script>{INDEX_JS}</script>"""
    return _page("Latent dashboard", body)


def write_site(data, out: str | Path, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    out = Path(out)
    pages = out / "latents"
    pages.mkdir(parents=True, exist_ok=True)
    for old in pages.glob("*.html"):  # pages of a previous, larger dictionary
        if old.stem.isdigit() and int(old.stem) >= data.stats.num_latents:
            old.unlink()
    names = Tokens(data.decode, data.special_ids)
    (out / "style.css").write_text(STYLE, encoding="utf-8")
    for j in tqdm(range(data.stats.num_latents), desc="latent pages", unit="page", disable=not progress):
        (pages / f"{j}.html").write_text(latent_page(data, j, names), encoding="utf-8")
    (out / "index.html").write_text(index_page(data, names), encoding="utf-8")
    return out / "index.html"
