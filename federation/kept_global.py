"""Send the global state down once per round, not twice (run config ``keep-global``).

With federated evaluation every round, the evaluate instruction of round r and the train instruction
of round r + 1 carry the same arrays: the global state aggregated in round r. Under ``keep-global``
the server names the evaluate instruction's arrays by their digest (config key :data:`KEEP`); the
site keeps that record in its ``context.state`` (which Flower keeps per node for the whole run, in
simulation and in deployment) and, once its evaluate reply is accepted, the server sends the next
train instruction without arrays, naming the same digest (config key :data:`USE`). The site takes its
kept copy (and drops it); if it has none with that digest (its SuperNode restarted in between), it
replies with an error naming the site and the digest, and the server goes on without it for that
round, as for any failed site; its next instruction carries the arrays again.

The digest is SHA-256 over every entry's key, dtype, shape and bytes, in the record's order, of the
record as it travels (after the transport cast and packing), so both sides compute it on the same
bytes; the site does not recompute it, it compares the names.
"""

from __future__ import annotations

import hashlib

from flwr.app import ArrayRecord, ConfigRecord, Context

KEEP = "keep-global"  # evaluate instruction config: keep these arrays under this digest
USE = "kept-global"  # train instruction config (no arrays): use the kept arrays with this digest
_ARRAYS, _NAME = "kept-global", "kept-global-digest"  # context.state records


class KeptGlobalMissing(RuntimeError):
    """A train instruction without arrays reached a site that holds no copy with its digest."""


def record_digest(record: ArrayRecord) -> str:
    """SHA-256 (hex) of an ArrayRecord's keys, dtypes, shapes and bytes, in its order."""
    h = hashlib.sha256()
    for key, value in record.items():
        h.update(f"{key}\0{value.dtype}\0{list(value.shape)}\0".encode())
        h.update(value.data)
    return h.hexdigest()


def keep(context: Context, record: ArrayRecord, digest: str) -> None:
    """Keep ``record`` (as received) in the site's context under ``digest``, replacing any older copy."""
    context.state[_ARRAYS] = record
    context.state[_NAME] = ConfigRecord({"digest": digest})


def take(context: Context, digest: str, site: str) -> ArrayRecord:
    """The kept record named ``digest``, removed from the context; :class:`KeptGlobalMissing` if the
    site holds none (or an older one)."""
    named = context.state.config_records.get(_NAME)
    held = str(named["digest"]) if named is not None else None
    if held != digest or _ARRAYS not in context.state.array_records:
        have = f"it holds {held[:12]}" if held else "it holds none"
        raise KeptGlobalMissing(
            f"site {site}: the server sent no arrays and named kept global state {digest[:12]}, but "
            f"{have} (context reset since the last evaluation?); it sits this round out"
        )
    record = context.state.array_records[_ARRAYS]
    del context.state[_ARRAYS]
    del context.state[_NAME]
    return record
