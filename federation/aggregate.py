"""Weighted averaging of site states, with integer buffers kept integer.

Weight rules are registered by name (``weights`` in the run config): a site's weight is computed
from the counts it reports in its training MetricRecord.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

WEIGHT_RULES: dict[str, Callable[[Mapping[str, float]], float]] = {
    "labeled": lambda m: float(m["num-labeled"]),
    "unlabeled": lambda m: float(m["num-unlabeled"]),
    "both": lambda m: float(m["num-labeled"]) + float(m["num-unlabeled"]),
}


def site_weights(metrics: Sequence[Mapping[str, float]], rule: str) -> list[float]:
    """Normalised weights (sum 1) of the sites under ``rule``."""
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {rule!r}; choose from {sorted(WEIGHT_RULES)}")
    raw = [WEIGHT_RULES[rule](m) for m in metrics]
    total = sum(raw)
    if total <= 0 or any(w < 0 for w in raw):
        raise ValueError(f"weights {rule!r}: site weights {raw} must be >= 0 with a positive sum")
    return [w / total for w in raw]


def aggregate_states(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted mean of float arrays (accumulated in float64, returned as float32); integer arrays
    (BatchNorm's ``num_batches_tracked``) take the maximum over sites: a step counter, not a weight,
    and averaging it would turn it into a float."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    keys = list(states[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [np.asarray(s[key]) for s in states]
        if np.issubdtype(arrays[0].dtype, np.integer) or arrays[0].dtype == np.bool_:
            out[key] = np.max(np.stack(arrays), axis=0).astype(arrays[0].dtype)
        else:
            acc = np.zeros(arrays[0].shape, dtype=np.float64)
            for arr, w in zip(arrays, weights, strict=True):
                acc += w * arr.astype(np.float64)
            out[key] = acc.astype(np.float32)
    return out
