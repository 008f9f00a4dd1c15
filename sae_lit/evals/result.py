"""The one shape every eval returns, so the suite, the callbacks and the CLI treat them alike."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """Scalars under their DESIGN.md names (``eval/delta_ce``, ...): TensorBoard tags and JSON keys."""
    details: dict[str, Any] = field(default_factory=dict)
    """Everything else worth keeping (per-task scores, baselines, settings), JSON-serialisable."""
    figures: dict[str, Any] = field(default_factory=dict)
    """matplotlib figures by TensorBoard tag; written as PNG next to the report."""
