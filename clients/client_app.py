"""The hospital's ClientApp: message -> :mod:`federation.local` -> reply message.

``train``: load the global tensors (+ this site's BatchNorm under FedBN, kept in ``context.state``),
train ``local-iterations`` steps of the global schedule, reply with exactly the shareable tensors
(:func:`federation.state.shareable_keys`) and a MetricRecord (mean losses, ``num-examples`` = labeled
slices, ``num-labeled``, ``num-unlabeled``). ``evaluate``: per-class validation Dice of the global model.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.config import parse_run_config, site_from_node_config
from federation.local import evaluate_round, get_session, train_round
from federation.state import batchnorm_keys, from_record, shareable_keys, to_record

app = ClientApp()

LOCAL_KEY = "site-local"  # context.state record of tensors that never leave the site


def _session(context: Context):
    cfg, fed = parse_run_config(dict(context.run_config))
    site = site_from_node_config(dict(context.node_config), cfg, fed)
    return get_session(site, cfg), fed


def _local_state(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.array_records.get(LOCAL_KEY)
    return from_record(record) if record is not None else {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    session, fed = _session(context)
    server_round = int(msg.content["config"]["server-round"])
    state, metrics = train_round(
        session, from_record(msg.content["arrays"]), _local_state(context), server_round, fed
    )
    if fed.fedbn:  # kept on the site, in fp32 whatever the transport
        keys = sorted(batchnorm_keys(session.trainer.method))
        context.state[LOCAL_KEY] = to_record(state, keys, "fp32")
    arrays = to_record(state, shareable_keys(session.trainer.method, fed), fed.transport)
    metrics.update(
        {
            "num-examples": session.num_labeled,
            "num-labeled": session.num_labeled,
            "num-unlabeled": session.num_unlabeled,
        }
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    session, _ = _session(context)
    global_state = from_record(msg.content["arrays"]) if "arrays" in msg.content else {}
    dice = evaluate_round(session, global_state, _local_state(context))
    metrics = {**dice, "num-examples": len(session.trainer.data.val)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
