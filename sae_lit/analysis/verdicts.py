"""How the reproduction report turns measurements into verdicts, and its table helpers.

Every comparison is an interval of a difference whose sign the claim predicts: across seeds
(Student t over replicate runs) where the sweep has replicates, else the eval's own bootstrap
interval. A comparison *holds* when its interval lies on the predicted side of zero, *does not
hold* when it lies on the other side, and is *inconclusive* when it straddles zero or cannot
be formed (one seed and no bootstrap). A claim made of several comparisons holds when all
hold, does not hold when any does not, and is inconclusive otherwise.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

from sae_lit.common import fmt
from sae_lit.evals.stats import side, slope_interval, t_interval

HOLDS, FAILS, UNSURE, MISSING = "holds", "does not hold", "inconclusive", "not measured"


def judge(iv: dict | None, want: int) -> str:
    """The word for one interval ({"lo", "hi"}) whose sign the claim predicts to be ``want``."""
    if not iv:
        return UNSURE
    s = side(iv.get("lo", float("nan")), iv.get("hi", float("nan")))
    return HOLDS if s == want else FAILS if s == -want else UNSURE


def combine(words: list[str]) -> str:
    if not words:
        return MISSING
    if FAILS in words:
        return FAILS
    return HOLDS if all(w == HOLDS for w in words) else UNSURE


def ci_text(iv: dict | None, digits: int = 4) -> str:
    """"m [lo, hi]" (or "m, no interval" when it cannot be formed)."""
    if not iv or iv.get("mean") is None or not math.isfinite(iv.get("mean", float("nan"))):
        return "–"
    m = fmt(iv["mean"], digits) if "mean" in iv else fmt(iv.get("slope"), digits)
    lo, hi = iv.get("lo"), iv.get("hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{m} (no interval)"
    return f"{m} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def slope_text(iv: dict) -> str:
    if not math.isfinite(iv.get("slope", float("nan"))):
        return "–"
    return f"{iv['slope']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}] per doubling of n ({iv['n']} runs)"


def seed_of(row) -> int:
    s = row.get("seed")
    if s is None and row.get("settings"):
        s = json.loads(row["settings"]).get("seed")
    return int(s or 0)


def config_key(row) -> str:
    """What a run is apart from its seed: its settings without the seed (older tables: the
    architecture columns)."""
    if row.get("settings"):
        settings = json.loads(row["settings"])
        settings.pop("seed", None)
        return json.dumps(settings, sort_keys=True)
    cols = ("activation", "num_latents", "k", "l1_coeff", "multi_topk", "tied_init", "auxk_alpha", "b_dec_init", "lr")
    return json.dumps([row.get(c) for c in cols])


def replicates(rows) -> dict[str, list]:
    """Runs grouped by configuration, each group sorted by seed."""
    out = defaultdict(list)
    for r in rows:
        out[config_key(r)].append(r)
    return {k: sorted(v, key=seed_of) for k, v in out.items()}


def across_seeds(values) -> dict:
    """t interval of a mean over seeds (no interval with fewer than two)."""
    return t_interval([v for v in values if v is not None])


def metric_interval(rows, key: str) -> dict:
    """Interval of a run metric: across seeds when there are replicates, else the run's own
    bootstrap columns ``<key>_ci_lo`` / ``<key>_ci_hi``, else none."""
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    if len(vals) >= 2:
        return {**across_seeds(vals), "how": f"across {len(vals)} seeds"}
    if len(vals) == 1:
        r = next(r for r in rows if r.get(key) is not None)
        lo, hi = r.get(f"{key}_ci_lo"), r.get(f"{key}_ci_hi")
        if lo is not None and hi is not None:
            return {"mean": vals[0], "lo": lo, "hi": hi, "n": 1, "how": "bootstrap (one seed)"}
        return {"mean": vals[0], "lo": float("nan"), "hi": float("nan"), "n": 1, "how": "one seed, no interval"}
    return {}


def trend(points: list[tuple[float, float]]) -> dict:
    """Slope of a metric against log2 n, with its interval (OLS over every run)."""
    pts = [(n, v) for n, v in points if v is not None and math.isfinite(v)]
    return slope_interval([math.log2(n) for n, _ in pts], [v for _, v in pts])


# --- tables -------------------------------------------------------------------------------------

L1_FAMILIES = ("relu", "prolu", "gated")
LABEL = {"topk": "TopK", "relu": "ReLU+L1", "prolu": "ProLU", "gated": "Gated", "batchtopk": "BatchTopK",
         "matryoshka": "Matryoshka BatchTopK"}


def in_group(rows, group):
    return [r for r in rows if group in str(r.get("groups", "")).split(";")]


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(out)


def mean_of(values) -> float | None:
    """Mean of the values that are there (None when none is)."""
    v = [x for x in values if x is not None]
    return float(sum(v) / len(v)) if v else None


def run_ci(row, key: str) -> dict:
    """A run's metric with its bootstrap columns (``<key>_ci_lo`` / ``_ci_hi``) as an interval."""
    return {"mean": row.get(key), "lo": row.get(f"{key}_ci_lo"), "hi": row.get(f"{key}_ci_hi")}
