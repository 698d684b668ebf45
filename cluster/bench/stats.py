"""Summary statistics shared by the `kvfleet bench` commands (no dependencies: the simulation runs
where only the standard library and router/ are installed)."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `xs` (nan if empty): the one rule every kvfleet bench uses."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]
