"""The site's stylesheet and the index page's script (no libraries, nothing fetched from the network)."""

STYLE = """\
:root { --fg: #1d2330; --muted: #667085; --line: #e3e6ec; --bg: #fff; --panel: #f7f8fa;
        --act: 255, 122, 0; --accent: #2858c7; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 18px 24px 40px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0; }
.muted { color: var(--muted); }
header.top { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; border-bottom: 1px solid var(--line); padding-bottom: 10px; }
header.top nav { margin-left: auto; display: flex; gap: 12px; }
.cards { display: flex; gap: 10px; flex-wrap: wrap; margin: 14px 0 4px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 18px; } .card span { color: var(--muted); font-size: 12px; }
.grid2 { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 24px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
svg.hist { width: 100%; max-width: 560px; height: auto; background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
svg.hist text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg.hist rect.bar { fill: rgb(var(--act)); } svg.hist rect.bar:hover { fill: #c25700; }
table { border-collapse: collapse; }
table.logits { width: 100%; } table.logits td { padding: 2px 8px; border-bottom: 1px solid var(--line); }
table.logits td.num { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
.tok { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eef1f6; border-radius: 3px; padding: 0 3px; white-space: pre; }
.txt i, .tok i, .ws { font-style: normal; color: #98a2b3; }
.sp { color: #98a2b3; font-style: italic; }
.ctxs { border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.ctx { display: flex; gap: 10px; padding: 5px 10px; border-bottom: 1px solid var(--line); align-items: baseline; }
.ctx:last-child { border-bottom: 0; } .ctx:nth-child(even) { background: #fcfcfd; }
.ctx .v { flex: 0 0 52px; text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
.ctx .src { flex: 0 0 150px; color: var(--muted); font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ctx .txt { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; white-space: pre-wrap; word-break: break-word; }
.a { background: rgba(var(--act), var(--a)); border-radius: 2px; }
.a.m { outline: 1.5px solid #b54700; }
.x { color: #b0b6c2; }
.band h3 { font-size: 13px; margin: 14px 0 6px; font-weight: 600; }
.n2g { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; }
.n2g .pat { margin: 3px 0; } .n2g .tok { margin-right: 2px; }
.legend { color: var(--muted); font-size: 12px; margin-top: 24px; }
.controls { display: flex; gap: 10px; align-items: center; margin: 14px 0 8px; flex-wrap: wrap; }
.controls input[type=search] { flex: 1 1 320px; padding: 6px 10px; border: 1px solid #c9ced8; border-radius: 6px; font-size: 14px; }
.controls select, .controls button { padding: 5px 10px; border: 1px solid #c9ced8; border-radius: 6px; background: #fff; font-size: 13px; }
.controls button:disabled { opacity: .4; }
table.latents { width: 100%; } table.latents th, table.latents td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
table.latents th { position: sticky; top: 0; background: #fff; cursor: pointer; user-select: none; white-space: nowrap; border-bottom: 2px solid var(--line); }
table.latents th.sorted::after { content: " \\25BE"; } table.latents th.sorted.asc::after { content: " \\25B4"; }
table.latents td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.latents td.toks { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; white-space: pre-wrap; max-width: 260px; }
table.latents td.toks .tok { display: inline-block; margin: 1px 0; }
table.latents tr:hover td { background: #f5f7fb; }
.dbar { display: inline-block; height: 8px; background: rgb(var(--act)); border-radius: 2px; vertical-align: middle; margin-right: 6px; opacity: .8; }
.summary { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 560px); gap: 24px; align-items: start; }
@media (max-width: 900px) { .summary { grid-template-columns: 1fr; } }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
"""

# Index page: the table data is a JSON block in the page; this renders one page of rows at a
# time, so 16k+ latents stay fast. State (search, filter, sort, page) lives in the URL hash so
# the back button from a latent page returns to the same view.
INDEX_JS = """\
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const C = D.columns, rows = D.rows, PAGE = 100;
  const col = Object.fromEntries(C.map((c, i) => [c, i]));
  const hay = rows.map(r => [r[col.id], r[col.top_tokens].join(" "), r[col.logits].join(" "), r[col.n2g].join(" ")].join("\\u0001").toLowerCase());
  const q = document.getElementById("q"), filter = document.getElementById("filter");
  const tbody = document.querySelector("#latents tbody"), info = document.getElementById("count");
  const prev = document.getElementById("prev"), next = document.getElementById("next");
  let state = { q: "", f: "all", s: "id", d: 1, p: 0 }, view = [];

  function esc(s) {
    return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function num(x, digits) { return x === null || x === undefined ? "" : Number(x).toPrecision(digits); }
  function pct(x) {
    if (!x) return "0";
    const p = 100 * x;
    return (p >= 1 ? p.toFixed(1) : p >= 0.01 ? p.toFixed(3) : p.toExponential(1)) + "%";
  }
  function dbar(x) {
    // log10 density from 1e-5 (1 px) to 1e-1 (60 px)
    if (!x) return "";
    const w = Math.min(60, Math.max(1, Math.round(60 * (Math.log10(x) + 5) / 4)));
    return '<span class="dbar" style="width:' + w + 'px"></span>';
  }
  function chips(list) { return list.map(t => '<span class="tok">' + esc(t) + "</span>").join(" "); }
  function row(r) {
    const id = r[col.id];
    return "<tr><td><a href=\\"latents/" + id + ".html\\">" + id + "</a></td>" +
      '<td class="num">' + dbar(r[col.density]) + pct(r[col.density]) + "</td>" +
      '<td class="num">' + num(r[col.max], 3) + "</td>" +
      '<td class="num">' + num(r[col.mean], 3) + "</td>" +
      '<td class="toks">' + chips(r[col.top_tokens]) + "</td>" +
      '<td class="toks">' + chips(r[col.logits]) + "</td>" +
      '<td class="toks">' + chips(r[col.n2g]) + "</td>" +
      '<td class="num">' + num(r[col.precision], 2) + "</td>" +
      '<td class="num">' + num(r[col.recall], 2) + "</td></tr>";
  }
  function keep(i) {
    const r = rows[i];
    if (state.f === "alive" && !r[col.density]) return false;
    if (state.f === "dead" && r[col.density]) return false;
    if (state.f === "n2g" && !r[col.n2g].length) return false;
    if (!state.q) return true;
    if (/^\\d+$/.test(state.q)) return String(r[col.id]) === state.q || hay[i].includes(state.q);
    return hay[i].includes(state.q);
  }
  function compute() {
    view = [];
    for (let i = 0; i < rows.length; i++) if (keep(i)) view.push(i);
    const k = col[state.s], d = state.d;
    view.sort((a, b) => {
      let x = rows[a][k], y = rows[b][k];
      if (Array.isArray(x)) { x = x.join(" "); y = y.join(" "); }  // token lists sort as text
      const xn = x === null || x === "", yn = y === null || y === "";
      if (xn || yn) return xn === yn ? rows[a][0] - rows[b][0] : (xn ? 1 : -1);  // blanks last
      if (x < y) return -d; if (x > y) return d;
      return rows[a][0] - rows[b][0];
    });
  }
  function render() {
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    state.p = Math.min(Math.max(0, state.p), pages - 1);
    const lo = state.p * PAGE, hi = Math.min(view.length, lo + PAGE);
    tbody.innerHTML = view.slice(lo, hi).map(i => row(rows[i])).join("");
    info.textContent = view.length ? (lo + 1) + "\\u2013" + hi + " of " + view.length + " latents (page " + (state.p + 1) + "/" + pages + ")" : "no latents match";
    prev.disabled = state.p === 0; next.disabled = state.p >= pages - 1;
    document.querySelectorAll("#latents th").forEach(th => {
      th.classList.toggle("sorted", th.dataset.k === state.s);
      th.classList.toggle("asc", th.dataset.k === state.s && state.d === 1);
    });
    history.replaceState(null, "", "#" + new URLSearchParams(state).toString());
  }
  function update() { compute(); render(); }

  if (location.hash.length > 1) {
    const h = new URLSearchParams(location.hash.slice(1));
    for (const k of Object.keys(state)) if (h.has(k)) state[k] = typeof state[k] === "number" ? Number(h.get(k)) || 0 : h.get(k);
    if (!(state.s in col)) state.s = "id";
    if (state.d !== 1 && state.d !== -1) state.d = 1;
  }
  q.value = state.q; filter.value = state.f;
  q.addEventListener("input", () => { state.q = q.value.trim().toLowerCase(); state.p = 0; update(); });
  filter.addEventListener("change", () => { state.f = filter.value; state.p = 0; update(); });
  prev.addEventListener("click", () => { state.p--; render(); });
  next.addEventListener("click", () => { state.p++; render(); });
  document.querySelectorAll("#latents th").forEach(th => th.addEventListener("click", () => {
    const k = th.dataset.k;
    if (state.s === k) state.d = -state.d; else { state.s = k; state.d = k === "id" || k === "top_tokens" || k === "logits" || k === "n2g" ? 1 : -1; }
    state.p = 0; update();
  }));
  update();
})();
"""
