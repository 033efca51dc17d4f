"""Checks on a site's reply before anything of it is aggregated.

A train reply must hold exactly one ArrayRecord (packed or not) with exactly the expected keys, each
with the global tensor's shape and the dtype the transport implies (float32, or float16 under fp16;
integer buffers keep their integer dtype), only finite values, non-negative counters, an update
whose distance from the global state is not absurd (``max-update-norm`` times the global state's
norm), and one MetricRecord whose counts are finite and non-negative (plus, under
``evaluate-then-train``, the evaluation's, checked as an evaluation reply). Evaluation replies need one
MetricRecord with finite values and Dice in [0, 1]. Every failure is an :class:`UpdateRejected`
with a one-line reason, which the strategy logs and records; the reply then counts for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from federation.evaluate_then_train import EVALUATION
from federation.packing import PackError, unpack_record

TRAIN_COUNTS = ("num-examples", "num-labeled", "num-unlabeled")
EVALUATE_COUNTS = ("num-examples",)
FLOAT_DTYPE = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}


class UpdateRejected(ValueError):
    """A reply that must not be aggregated; ``str(err)`` is the reason (one line)."""


@dataclass(frozen=True)
class UpdateRules:
    """What a valid train reply looks like in this round. Without a ``reference`` (the strategy has
    not sent a global state yet, e.g. in unit tests) only keys and finiteness are checked."""

    keys: frozenset[str]
    reference: Mapping[str, np.ndarray] | None = None  # the global state sent this round
    transport: str = "fp32"
    max_update_norm: float = 10.0  # relative to ||global||; 0 disables the check
    key_sets: tuple[frozenset[str], ...] = ()  # cross-task: a reply holds exactly one of these

    def expected_dtype(self, ref: np.ndarray) -> np.dtype:
        return FLOAT_DTYPE[self.transport] if np.issubdtype(ref.dtype, np.floating) else ref.dtype


def _one(records: Mapping, what: str):
    if len(records) != 1:
        raise UpdateRejected(f"expected exactly one {what}, got {len(records)}")
    return next(iter(records.values()))


def check_metrics(content: RecordDict, required: Sequence[str]) -> dict[str, float]:
    """The reply's single MetricRecord as floats; counts must be finite and >= 0."""
    record = _one(content.metric_records, "MetricRecord")
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UpdateRejected(f"metric {key!r} is not a single number")
        if not math.isfinite(value):
            raise UpdateRejected(f"metric {key!r} is not finite ({value})")
        metrics[key] = float(value)
    missing = [k for k in required if k not in metrics]
    if missing:
        raise UpdateRejected(f"metrics lack {missing}")
    negative = [k for k in required if metrics[k] < 0]
    if negative:
        raise UpdateRejected(f"negative counts {negative}")
    return metrics


def check_arrays(arrays: Mapping[str, np.ndarray], rules: UpdateRules) -> None:
    """Keys, shapes, dtypes, finiteness and update norm of one site's state."""
    keys = set(arrays)
    if rules.key_sets and keys not in rules.key_sets:
        extra = sorted(keys - rules.keys)
        raise UpdateRejected(f"keys are not one task's set (extra {extra[:5]}, {len(keys)} keys)")
    if not rules.key_sets and keys != rules.keys:
        extra, missing = sorted(keys - rules.keys), sorted(rules.keys - keys)
        raise UpdateRejected(f"keys differ: extra {extra[:5]}, missing {missing[:5]}")
    diff_sq, ref_sq = 0.0, 0.0
    for key in sorted(keys):
        arr = arrays[key]
        ref = rules.reference.get(key) if rules.reference is not None else None
        if ref is not None and arr.shape != ref.shape:
            raise UpdateRejected(f"{key}: shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if ref is not None and arr.dtype != rules.expected_dtype(ref):
            raise UpdateRejected(f"{key}: dtype {arr.dtype}, expected {rules.expected_dtype(ref)}")
        if np.issubdtype(arr.dtype, np.floating):
            values = arr.astype(np.float64)
            if not np.isfinite(values).all():
                bad = int((~np.isfinite(values)).sum())
                raise UpdateRejected(f"{key}: {bad} non-finite value(s) (NaN / inf)")
            if ref is not None:
                diff_sq += float(((values - ref.astype(np.float64)) ** 2).sum())
                ref_sq += float((ref.astype(np.float64) ** 2).sum())
        elif not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
            raise UpdateRejected(f"{key}: dtype {arr.dtype} is neither float nor integer")
        elif np.issubdtype(arr.dtype, np.signedinteger) and (arr < 0).any():
            raise UpdateRejected(f"{key}: negative counter")
    if rules.max_update_norm > 0 and rules.reference is not None:
        ratio = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-12)
        if not ratio <= rules.max_update_norm:
            raise UpdateRejected(
                f"update norm is {ratio:.3g} x the global model's norm (limit max-update-norm="
                f"{rules.max_update_norm:g})"
            )


def check_train_reply(
    content: RecordDict, rules: UpdateRules
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A train reply -> (its state as numpy arrays, its metrics), or :class:`UpdateRejected`."""
    record = _one(content.array_records, "ArrayRecord")
    try:
        record = unpack_record(record)
    except PackError as exc:
        raise UpdateRejected(f"unreadable packed arrays: {exc}") from None
    arrays = {k: v.numpy() for k, v in record.items()}
    check_arrays(arrays, rules)
    # Under evaluate-then-train the reply also holds the evaluation, which the strategy checks apart.
    training = RecordDict({k: v for k, v in content.metric_records.items() if k != EVALUATION})
    return arrays, check_metrics(training, TRAIN_COUNTS)


def check_evaluate_reply(content: RecordDict) -> dict[str, float]:
    """An evaluation reply's metrics (Dice must lie in [0, 1]), or :class:`UpdateRejected`."""
    if len(content.array_records):
        raise UpdateRejected("evaluation reply carries arrays")
    metrics = check_metrics(content, EVALUATE_COUNTS)
    bad = [k for k, v in metrics.items() if k.startswith("dice_") and not 0.0 <= v <= 1.0]
    if bad:
        raise UpdateRejected(f"Dice outside [0, 1]: {bad}")
    return metrics


def check_evaluation(content: RecordDict) -> dict[str, float]:
    """The evaluation a train reply carries under evaluate-then-train, checked as an evaluation reply."""
    if EVALUATION not in content.metric_records:
        raise UpdateRejected("the train reply carries no evaluation (evaluate-then-train)")
    return check_evaluate_reply(RecordDict({"metrics": content.metric_records[EVALUATION]}))
