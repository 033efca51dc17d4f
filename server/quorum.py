"""A Grid wrapper whose ``send_and_receive`` looks for replies often and stops waiting for stragglers.

Flower's own ``send_and_receive(timeout=T)`` waits for every reply or for T, and the deployment's Grid
looks for replies every 3 s (Flower 1.42, ``superlink/grid/http_grid.py``), so each phase of a round
waited 1.5 s on average after its last reply; here the wrapped Grid is asked every ``poll`` seconds
(run config ``reply-poll``). A site that crashed mid-round never replies, so each round would last
the full ``round-timeout``: with a finite ``grace`` (run config ``straggler-timeout``) the wait ends
when every reply is in, or ``grace`` seconds after ``quorum`` replies (of any kind: an error reply
means that site is done) have arrived, or at the timeout, whichever comes first; late replies are
dropped by Flower and the missing nodes are logged. An error reply can be answered in the same wait:
``resend(sent, reply)`` may return a message to send instead (once per node and call); the strategy
uses it to send the arrays to a site that lost its kept global state (:mod:`federation.kept_global`).
Everything else is the wrapped Grid's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.supercore.run import Run


class QuorumGrid(Grid):
    def __init__(
        self,
        grid: Grid,
        quorum: int,
        grace: float = float("inf"),
        poll: float = 0.2,
        resend: Callable[[Message, Message], Message | None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.grid, self.quorum, self.grace, self.poll = grid, quorum, grace, poll
        self.resend, self.sleep = resend, sleep

    # ---- delegated -----------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # ---- the change ----------------------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        dst = {m.metadata.dst_node_id for m in messages}
        pending = set(self.push_messages(messages))
        sent = len(pending)
        need = min(self.quorum, sent)
        start = time.monotonic()
        deadline = start + timeout if timeout is not None else float("inf")
        grace_end = None
        replies: list[Message] = []
        to_node = {m.metadata.dst_node_id: m for m in messages}  # one instruction per node
        while pending:
            got = list(self.pull_messages(pending))
            pending -= {m.metadata.reply_to_message_id for m in got}
            for reply in got:
                again = self._answer(to_node, reply)
                if again is None:
                    replies.append(reply)
                else:  # this node's reply is still to come
                    pending.update(self.push_messages([again]))
            if not pending or len(replies) >= sent:  # (a Grid may use its own message ids)
                pending = set()
                break
            now = time.monotonic()
            if grace_end is None and len(replies) >= need:
                grace_end = now + self.grace
            if now >= deadline or (grace_end is not None and now >= grace_end):
                missing = sorted(dst - {m.metadata.src_node_id for m in replies})
                why = "round-timeout" if now >= deadline else f"straggler grace {self.grace:g} s after quorum"
                log(
                    WARNING,
                    "%d of %d replies after %.0f s (%s); going on without nodes %s",
                    len(replies),
                    len(dst),
                    now - start,
                    why,
                    missing,
                )
                break
            self.sleep(self.poll)
        if not pending:
            log(INFO, "all %d replies after %.0f s", len(replies), time.monotonic() - start)
        return replies

    def _answer(self, to_node: dict[int, Message], reply: Message) -> Message | None:
        """A message to send instead of accepting the error ``reply`` (at most once per node)."""
        sent = to_node.get(reply.metadata.src_node_id)
        if self.resend is None or sent is None or not reply.has_error():
            return None
        again = self.resend(sent, reply)
        if again is not None:
            del to_node[reply.metadata.src_node_id]
        return again
