"""Aggregation of site states: weighted mean, or a robust coordinate-wise rule; integer buffers
kept integer.

Weight rules are registered by name (``weights`` in the run config): a site's weight is computed
from the counts it reports in its training MetricRecord. Aggregation rules are registered by name
(``aggregation``): ``mean`` is the weighted mean; ``median`` and ``trimmed-mean`` are coordinate-wise
and unweighted, so one poisoned site (or one that overstates its counts) cannot pull a coordinate
past the honest sites' values (with 3 sites the median ignores any one of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence

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


def _digest(state: Mapping[str, np.ndarray], keys: Collection[str] | None = None) -> bytes:
    """A hash of a state's keys and array bytes (about 1.3 ms per MB), or of those in ``keys``."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state if keys is None else set(keys) & set(state)):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key]).view(np.uint8))
    return h.digest()


def canonical_order(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    keys: Collection[str] | None = None,
) -> tuple[list[Mapping[str, np.ndarray]], list[float]]:
    """The states (and their weights) ordered by content, so that float sums over them do not depend
    on the order the replies came in or on the sites' node ids (which a simulation draws anew each
    run). Equal digests are equal states; their weights break the tie.

    ``keys``: order by these arrays only, for a caller that sums nothing else (cheaper to hash)."""
    order = sorted(range(len(states)), key=lambda i: (_digest(states[i], keys), weights[i]))
    return [states[i] for i in order], [weights[i] for i in order]


def _is_integer(arr: np.ndarray) -> bool:
    return bool(np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_)


def _weighted_mean(arrays: list[np.ndarray], weights: Sequence[float], trim: float) -> np.ndarray:
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for arr, w in zip(arrays, weights, strict=True):
        acc += w * arr.astype(np.float64)
    return acc


def _median(arrays: list[np.ndarray], weights: Sequence[float], trim: float) -> np.ndarray:
    return np.median(np.stack([a.astype(np.float64) for a in arrays]), axis=0)


def _trimmed_mean(arrays: list[np.ndarray], weights: Sequence[float], trim: float) -> np.ndarray:
    """Per coordinate: sort the sites' values, drop floor(trim * n) at each end, mean the rest."""
    n = len(arrays)
    k = int(np.floor(trim * n))
    stacked = np.sort(np.stack([a.astype(np.float64) for a in arrays]), axis=0)
    return stacked[k : n - k].mean(axis=0)


# name -> f(float arrays of the sites, normalised weights, trim fraction) -> float64 array
AGGREGATORS: dict[str, Callable[[list[np.ndarray], Sequence[float], float], np.ndarray]] = {
    "mean": _weighted_mean,
    "median": _median,
    "trimmed-mean": _trimmed_mean,
}


def aggregate_states(
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    rule: str = "mean",
    trim: float = 0.25,
) -> dict[str, np.ndarray]:
    """Aggregate float arrays with ``rule`` (accumulated in float64, returned as float32).

    Integer arrays (BatchNorm's ``num_batches_tracked``, a step counter) stay integer: the maximum
    over sites under ``mean``, the lower median under the robust rules (so one hostile counter
    cannot win).

    States may hold different keys (cross-task federation: each task's U-Net comes only from that
    task's sites): every key is aggregated over the states that have it, their weights renormalised.
    """
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {rule!r}; choose from {sorted(AGGREGATORS)}")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim}")
    combine = AGGREGATORS[rule]
    keys = list(dict.fromkeys(k for s in states for k in s))
    states, weights = canonical_order(states, weights)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        holders = [i for i, s in enumerate(states) if key in s]
        arrays = [np.asarray(states[i][key]) for i in holders]
        w = weights
        if len(holders) < len(states):
            part = [weights[i] for i in holders]
            total = sum(part)
            w = [x / total for x in part] if total > 0 else [1.0 / len(part)] * len(part)
        if _is_integer(arrays[0]):
            stacked = np.stack(arrays)
            if rule == "mean":
                out[key] = np.max(stacked, axis=0).astype(arrays[0].dtype)
            else:
                out[key] = np.sort(stacked, axis=0)[(len(arrays) - 1) // 2].astype(arrays[0].dtype)
        else:
            out[key] = combine(arrays, w, trim).astype(np.float32)
    return out


def lora_average_bias(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> float | None:
    """How far plain LoRA averaging is from averaging the adapters' updates, over all layers:

        || sum_i w_i B_i  @  sum_i w_i A_i  -  sum_i w_i B_i A_i ||_F  /  || sum_i w_i B_i A_i ||_F

    (Frobenius norms summed over layers). 0 when the sites' A agree (FFA-LoRA sends no A at all:
    None). ``weights`` are the aggregation weights; None when no state carries an A/B pair.
    """
    lora_keys = {k for s in states for k in s if ".lora_A." in k or ".lora_B." in k}
    states, weights = canonical_order(states, weights, lora_keys)  # the adapters only: a few % of a state
    diff_sq = ref_sq = 0.0
    found = False
    for key_a in sorted(k for k in lora_keys if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        holders = [i for i, s in enumerate(states) if key_a in s and key_b in s]
        if not holders:
            continue
        found = True
        w = np.array([weights[i] for i in holders], dtype=np.float64)
        w = w / w.sum() if w.sum() > 0 else np.full(len(holders), 1.0 / len(holders))
        a = [states[i][key_a].astype(np.float64).reshape(states[i][key_a].shape[0], -1) for i in holders]
        b = [states[i][key_b].astype(np.float64).reshape(states[i][key_b].shape[0], -1) for i in holders]
        mean_of_products = sum(wi * bi @ ai for wi, ai, bi in zip(w, a, b, strict=True))
        product_of_means = sum(wi * bi for wi, bi in zip(w, b, strict=True)) @ sum(
            wi * ai for wi, ai in zip(w, a, strict=True)
        )
        diff_sq += float(((product_of_means - mean_of_products) ** 2).sum())
        ref_sq += float((mean_of_products**2).sum())
    if not found:
        return None
    return float(np.sqrt(diff_sq) / max(np.sqrt(ref_sq), 1e-30))
