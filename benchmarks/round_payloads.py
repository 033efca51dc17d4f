"""bench_round's payload part: the bytes of one site's state as tensors, as a serialised ArrayRecord
and as Flower's wire objects, and the time of each (de)serialisation step (site encode / decode,
server screening, aggregation, Flower's deflate / inflate). No federation runs here. See
``benchmarks/bench_round.py``."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from benchmarks.round_cases import MB, METHODS, TRAIN_COUNTS, Case
from federation.aggregate import aggregate_states
from federation.config import parse_run_config
from federation.inprocess import server_task_identity
from federation.local import initial_state
from federation.packing import is_packed, pack_record, unpack_record
from federation.state import from_record, record_nbytes, shareable_keys, to_record
from federation.validate import UpdateRules, check_train_reply


def tensor_entries(record: ArrayRecord) -> list[tuple[str, int]]:
    """(dtype, nbytes) of each tensor a record carries (a packed record is unpacked first)."""
    if is_packed(record):
        record = unpack_record(record)
    return [(str(a.dtype), math.prod(a.shape) * np.dtype(a.dtype).itemsize) for a in record.values()]


def record_sizes(record: ArrayRecord) -> dict[str, int]:
    """Tensor bytes (as the arrays' nbytes, float and integer apart) and serialised bytes."""
    entries = tensor_entries(record)
    floats = sum(n for dtype, n in entries if np.issubdtype(np.dtype(dtype), np.floating))
    return {
        "tensors": len(entries),
        "tensor_bytes": sum(n for _, n in entries),
        "float_bytes": floats,
        "int_bytes": sum(n for _, n in entries) - floats,
        "payload_bytes": record_nbytes(record),
    }


def deflate(msg: Message) -> dict[str, bytes]:
    """The message as Flower pushes it: every nested object (deduplicated by id), deflated."""
    objects = get_all_nested_objects(msg)
    get_object_tree(msg)
    return {oid: obj.deflate() for oid, obj in objects.items()}


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trained_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The state with noise on every float tensor (integer buffers as they are)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


def method_state(method: str, base_channels: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A trained-like global state of ``method`` and the keys a site sends."""
    cfg, fed = parse_run_config(
        {"model.base_channels": base_channels, "data.format": "phantom-cardiac", **METHODS[method]}
    )
    state, model = initial_state(cfg)
    return trained_like(state, 0), shareable_keys(model, fed)


def payload_row(state: dict, keys: list[str], transport: str, pack: bool, sites: int, repeat: int) -> dict:
    """Sizes and (de)serialisation times of one site's reply."""

    def encode() -> ArrayRecord:
        record = to_record(state, keys, transport)
        return pack_record(record) if pack else record

    record = encode()
    site_states = [trained_like(state, s + 1) for s in range(sites)]
    reference = {k: v.numpy() for k, v in to_record(state, keys, "fp32").items()}
    arrays = [{k: v.numpy() for k, v in to_record(s, keys, transport).items()} for s in site_states]
    rules = UpdateRules(frozenset(keys), reference, transport, max_update_norm=10.0)
    reply = RecordDict({"arrays": record, "metrics": MetricRecord(TRAIN_COUNTS)})
    msg = Message(content=reply, dst_node_id=1, message_type="train")
    contents = deflate(msg)
    weights = [1.0 / sites] * sites
    return {
        "transport": transport,
        "pack": pack,
        **record_sizes(record),
        "wire_bytes": sum(len(c) for c in contents.values()),
        "wire_objects": len(contents),
        "site_encode_ms": 1e3 * median_seconds(encode, repeat),
        "site_decode_ms": 1e3 * median_seconds(lambda: from_record(unpack_record(record)), repeat),
        "server_validate_ms": 1e3 * median_seconds(lambda: check_train_reply(reply, rules), repeat),
        "aggregate_ms": 1e3 * median_seconds(lambda: aggregate_states(arrays, weights), repeat),
        "wire_deflate_ms": 1e3 * median_seconds(lambda: deflate(msg), repeat),
        "wire_inflate_ms": 1e3
        * median_seconds(lambda: inflate_object_from_contents(msg.object_id, dict(contents)), repeat),
    }


def bench_payloads(methods: list[str], base_channels: int, sites: int, repeat: int, log) -> list[dict]:
    rows = []
    with server_task_identity():
        for method in methods:
            state, keys = method_state(method, base_channels)
            for transport in ("fp32", "fp16"):
                for pack in (False, True):
                    row = {"method": method, **payload_row(state, keys, transport, pack, sites, repeat)}
                    rows.append(row)
                    log(
                        f"  payload {method:<11} {transport} {'packed' if pack else 'arrays':<6} "
                        f"{row['tensor_bytes'] / MB:6.3f} MB, {row['wire_objects']} wire objects"
                    )
    return rows


def payload_for(payloads: list[dict], case: Case) -> dict | None:
    for row in payloads:
        if (row["method"], row["transport"], row["pack"]) == (case.method, case.transport, case.pack):
            return row
    return None
