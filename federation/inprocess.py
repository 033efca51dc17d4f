"""An in-process Grid: the real ServerApp and ClientApp exchange real Messages in one process.

Flower 1.42's only simulation backend is Ray; this Grid drives the apps directly, node by node,
for tests and quick runs. Each node keeps its own :class:`~flwr.app.Context` (node config, run config,
persistent ``state``) across rounds, as a SuperNode does; every reply is also kept in ``sent`` so a
test can inspect exactly what left each site.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any]):
        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nc in enumerate(node_configs)
        }
        self._ids = itertools.count()
        self._replies: dict[str, Message] = {}
        self.sent: list[tuple[int, Message]] = []  # (node id, reply) in order
        self._run: Run | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(
            content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = self.client_app(msg, self.contexts[node])
            self.sent.append((node, reply))
            mid = f"m{next(self._ids)}"
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextmanager
def server_task_identity() -> Iterator[None]:
    """Messages take their run / source ids from the process's task identity, which Flower's runtime
    sets; outside it (in process, tests) act as run 1, node 0, and restore the previous ids after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: dict[str, Any],
    node_configs: list[dict[str, Any]],
) -> InProcessGrid:
    """Run a whole federation in this process; returns the grid (replies in ``grid.sent``)."""
    grid = InProcessGrid(client_app, node_configs, run_config)
    server_context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    with server_task_identity():
        server_app(grid, server_context)
    return grid
