"""The hospital's ClientApp: message -> :mod:`federation.local` -> reply message.

``train``: load the global tensors (+ this site's BatchNorm under FedBN, kept in ``context.state``
and, with a state folder, on the site's disk: :mod:`federation.site_state`, so a resumed run has it),
train ``local-iterations`` steps of the global schedule, reply with exactly the shareable tensors
(:func:`federation.state.shareable_keys`) and a MetricRecord (mean losses, ``num-examples`` = labeled
slices, ``num-labeled``, ``num-unlabeled``). ``evaluate``: per-class validation Dice of the global model
(and ``evaluate-seconds``), by the U-Net alone when this process has not trained the site (no SAM built).
Under ``keep-global`` the evaluate instruction's arrays are kept in ``context.state`` and the next train
instruction arrives without arrays (:mod:`federation.kept_global`); a site without the copy replies
with an error that makes the server send the arrays. A train instruction flagged ``evaluate-first``
(:mod:`federation.evaluate_then_train`) is evaluated before training and the reply carries both.

A site whose data cannot be read (missing folder, corrupt file, bad label map: ``DataError`` /
``OSError``) replies with an error message naming the site, the file and the problem instead of
arrays; the server logs it and aggregates nothing from that site, and the other sites go on.
"""

from __future__ import annotations

import functools
import time
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from federation import kept_global
from federation.config import parse_run_config, site_from_node_config, uncached_sam_warning
from federation.evaluate_then_train import EVALUATE_FIRST, EVALUATION
from federation.local import evaluate_round, get_session, train_round
from federation.packing import pack_record, unpack_record
from federation.site_state import load_local_round, save_local_round, site_state_folder
from federation.state import batchnorm_keys, from_record, from_wire, shareable_keys, to_record, to_wire
from samatch import allocator
from samatch.io.base import DataError

app = ClientApp()

LOCAL_KEY = "site-local"  # context.state record of tensors that never leave the site
SITE_ERRORS = (DataError, OSError)  # the site's own data is unreadable: report it, do not crash


class SiteDataError(RuntimeError):
    """The site's data could not be loaded; ``str(err)`` names the site, the path and the problem."""


@functools.cache
def _log_allocator() -> None:
    """Once per process: the host allocator this ClientApp runs on (``deploy supernode --allocator``)."""
    log(INFO, "%s", allocator.describe())


def _session(context: Context, evaluate_only: bool = False):
    _log_allocator()
    cfg, fed = parse_run_config(dict(context.run_config))
    site = site_from_node_config(dict(context.node_config), cfg, fed)
    warning = None if evaluate_only else uncached_sam_warning(dict(context.node_config), site, cfg)
    if warning:
        log(WARNING, "%s", warning)
    try:
        return get_session(site, cfg, evaluate_only), fed
    except SITE_ERRORS as exc:
        raise site_data_error(site.name, exc) from exc


def site_data_error(site: str, exc: Exception) -> SiteDataError:
    return SiteDataError(f"site {site}: cannot load its data: {exc}")


def _local_state(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.array_records.get(LOCAL_KEY)
    return from_record(record) if record is not None else {}


def _arrays(msg: Message, context: Context, site: str) -> ArrayRecord:
    """The instruction's global arrays, or the copy this site kept from its last evaluation."""
    if "arrays" in msg.content.array_records:
        kept_global.discard(context)  # not needed: drop it
        return msg.content["arrays"]
    config = msg.content["config"]
    if kept_global.USE not in config:
        raise KeyError("train instruction has neither arrays nor a kept-global digest")
    return kept_global.take(context, str(config[kept_global.USE]), site)


def _error_reply(msg: Message, exc: Exception) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        session, fed = _session(context)
    except SiteDataError as exc:
        return _error_reply(msg, exc)
    server_round = int(msg.content["config"]["server-round"])
    try:
        record = _arrays(msg, context, session.site.name)
    except kept_global.KeptGlobalMissing as exc:
        return _error_reply(msg, exc)
    task = session.site.task  # cross-task: this site's U-Net travels under task.<name>.
    global_state = from_wire(from_record(unpack_record(record)), task, fed.share_adapters)
    local = _local_state(context)
    folder = site_state_folder(context.node_config, fed.site_state_dir, session.site.name)
    if fed.fedbn and not local and server_round > 1:  # a resumed run: this node's context is new
        saved = load_local_round(folder, server_round - 1) if folder else None
        if saved is None:
            log(
                WARNING,
                "site %s: no saved FedBN state of round %d: initial BatchNorm",
                session.site.name,
                server_round - 1,
            )
        local = saved or {}
    evaluation = None
    if msg.content["config"].get(EVALUATE_FIRST):  # evaluate-then-train: this round's state, untrained
        try:
            evaluation = _evaluation(session, global_state, local)
        except SiteDataError as exc:
            return _error_reply(msg, exc)
    state, metrics = train_round(session, global_state, local, server_round, fed)
    if fed.fedbn:  # kept on the site, in fp32 whatever the transport
        keys = sorted(batchnorm_keys(session.trainer.method))
        context.state[LOCAL_KEY] = to_record(state, keys, "fp32")
        if folder:
            save_local_round(folder, server_round, {k: state[k] for k in keys})
    wire = to_wire(
        {k: state[k] for k in shareable_keys(session.trainer.method, fed)}, task, fed.share_adapters
    )
    arrays = to_record(wire, sorted(wire), fed.transport)
    metrics.update(
        {
            "num-examples": session.num_labeled,
            "num-labeled": session.num_labeled,
            "num-unlabeled": session.num_unlabeled,
        }
    )
    arrays = pack_record(arrays) if fed.pack_arrays else arrays
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(evaluation)
    return Message(content=content, reply_to=msg)


def _evaluation(session, global_state: dict, local: dict) -> dict[str, float]:
    """Validation Dice of ``global_state`` (with the site's own tensors ``local``) and the reply's
    seconds and count. The first evaluation of a session reads the validation volumes (a site's
    session reads them on first use): SiteDataError when they cannot be read."""
    t0 = time.perf_counter()
    try:
        dice = evaluate_round(session, global_state, local)
    except SITE_ERRORS as exc:
        raise site_data_error(session.site.name, exc) from exc
    seconds = time.perf_counter() - t0  # like train-seconds: lets a round's overhead be told from compute
    return {**dice, "evaluate-seconds": seconds, "num-examples": len(session.trainer.data.val)}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        session, fed = _session(context, evaluate_only=True)
    except SiteDataError as exc:
        return _error_reply(msg, exc)
    arrays = msg.content.array_records.get("arrays")
    if arrays is not None and kept_global.KEEP in msg.content["config"]:  # the next train instruction's
        kept_global.keep(context, arrays, str(msg.content["config"][kept_global.KEEP]))
    arrays = from_record(unpack_record(arrays)) if arrays is not None else {}
    global_state = from_wire(arrays, session.site.task, fed.share_adapters)
    try:
        metrics = _evaluation(session, global_state, _local_state(context))
    except SiteDataError as exc:
        return _error_reply(msg, exc)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
