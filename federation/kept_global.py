"""Send the global state down once per round, not twice (run config ``keep-global``).

With federated evaluation every round, the evaluate instruction of round r and the train instruction
of round r + 1 carry the same arrays: the global state aggregated in round r. Under ``keep-global``
the server names the evaluate instruction's arrays by their digest (config key :data:`KEEP`); the
site keeps that record in its ``context.state`` (which Flower keeps per node for the whole run, in
simulation and in deployment) and, once its evaluate reply is accepted, the server sends the next
train instruction without arrays, naming the same digest (config key :data:`USE`). The site takes its
kept copy (and drops it); if it has none with that digest, it replies with an error naming the site
and the digest, and the server sends it the arrays (below).

The digest is SHA-256 over every entry's key, dtype, shape and bytes, in the record's order, of the
record as it travels (after the transport cast and packing); only the server computes it, the site
compares the names.

An accepted evaluate reply does not prove the copy survives: the context lives in the SuperNode's
memory only (a restarted SuperNode, which keeps its node id, starts with an empty one), and Flower
1.42 stores a ClientApp's context after its reply has gone. So a site that holds no copy replies with
an error carrying :data:`MISSING`, and the server sends that site the same instruction with the
arrays within the same phase (:meth:`server.strategy.FedSAMatch.resend_with_arrays` through
:class:`server.quorum.QuorumGrid`). A site drops its copy when it is used or when a train instruction
arrives with arrays, and the server asks for no copy in the run's last evaluation.
"""

from __future__ import annotations

import hashlib

from flwr.app import ArrayRecord, ConfigRecord, Context

KEEP = "keep-global"  # evaluate instruction config: keep these arrays under this digest
USE = "kept-global"  # train instruction config (no arrays): use the kept arrays with this digest
MISSING = "holds no kept global state"  # in the error reason of a site without the named copy
_ARRAYS, _NAME = "kept-global-arrays", "kept-global-digest"  # context.state records


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


def discard(context: Context) -> None:
    """Drop the kept copy, if any (it is not carried in every later message's context)."""
    for name in (_ARRAYS, _NAME):
        if name in context.state:
            del context.state[name]


def take(context: Context, digest: str, site: str) -> ArrayRecord:
    """The kept record named ``digest``, removed from the context; :class:`KeptGlobalMissing` if the
    site holds none (or another one)."""
    named = context.state.config_records.get(_NAME)
    held = str(named["digest"]) if named is not None else ""
    record = context.state.array_records.get(_ARRAYS)
    if held != digest or record is None:
        have = f"its copy is {held[:12]}" if held and record is not None else "it has none"
        raise KeptGlobalMissing(
            f"site {site} {MISSING} {digest[:12]}: {have} (context reset since its evaluation?)"
        )
    discard(context)
    return record
