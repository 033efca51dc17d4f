"""Many tensors <-> one byte array on the wire (run config ``pack-arrays``).

Flower 1.42 moves every ``Array`` of an ``ArrayRecord`` as its own object, one HTTPS request each
way per hop; the U-Net has 136 tensors, so a round cost ~3,000 requests between three sites and the
coordinator (measured ~35 s per phase on a 2-core machine). Packed, a state is one ``uint8`` Array
under :data:`PACKED_KEY`: an 8-byte little-endian header length, a JSON header
``[[key, dtype, shape], ...]``, then each tensor's C-order bytes. Keys, dtypes and shapes survive
exactly; a malformed pack raises :class:`PackError` (one line) so the strategy can reject it.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED_KEY = "__packed__"
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int64", "int32", "uint8", "bool"}
_MAX_HEADER = 16 * 1024 * 1024


class PackError(ValueError):
    """A packed record that cannot be read."""


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY]


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """An ArrayRecord as one packed ArrayRecord (a packed one is returned unchanged)."""
    if is_packed(record):
        return record
    header, parts = [], []
    for key, value in record.items():
        arr = np.asarray(value.numpy(), order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        header.append([key, arr.dtype.name, list(arr.shape)])
        parts.append(arr.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = struct.pack("<Q", len(head)) + head + b"".join(parts)
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The inverse of :func:`pack_record`; an unpacked record is returned unchanged."""
    if PACKED_KEY not in record:
        return record
    if len(record) != 1:
        raise PackError(f"packed record has extra keys {sorted(k for k in record if k != PACKED_KEY)[:5]}")
    arr = record[PACKED_KEY].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise PackError(f"packed array must be 1-D uint8, got {arr.dtype} {arr.shape}")
    blob = arr.tobytes()
    if len(blob) < 8:
        raise PackError("packed array shorter than its header")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(_MAX_HEADER, len(blob) - 8):
        raise PackError(f"packed header length {n} exceeds the payload")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"packed header is not JSON: {exc}") from None
    out = ArrayRecord()
    offset = 8 + n
    for entry in header if isinstance(header, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise PackError(f"packed header entry {entry!r} is not [key, dtype, shape]")
        key, dtype, shape = entry
        if dtype not in _ALLOWED_DTYPES:
            raise PackError(f"{key}: dtype {dtype!r} not allowed")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise PackError(f"{key}: bad shape {shape!r}")
        if key in out:
            raise PackError(f"{key}: appears twice")
        size = np.dtype(dtype).itemsize * math.prod(shape)
        if offset + size > len(blob):
            raise PackError(f"{key}: payload truncated")
        out[key] = Array(
            np.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        )
        offset += size
    if offset != len(blob):
        raise PackError(f"packed payload has {len(blob) - offset} trailing bytes")
    return out
