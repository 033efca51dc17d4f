"""bench_round's in-process engine: the real ServerApp and ClientApp through
:mod:`federation.inprocess`, with the apps' functions timed under labels (exclusive seconds, so the
labels split the round's overhead) and every instruction and reply kept for their bytes. See
``benchmarks/bench_round.py`` for what each label covers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from flwr.app import Message, RecordDict

from benchmarks.round_cases import Case, Scale
from benchmarks.round_payloads import record_sizes
from federation.local import clear_sessions


@dataclass
class _Frame:
    children: float = 0.0


class Clock:
    """Exclusive seconds of labelled calls: a call's time minus the labelled calls inside it, so no
    second is counted under two labels and their sum never exceeds the wall time."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []  # (label, start, exclusive seconds)
        self.round_start: dict[int, float] = {}
        self.round_end: dict[int, float] = {}
        self._stack: list[_Frame] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._stack.append(_Frame())
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                frame = self._stack.pop()
                if self._stack:
                    self._stack[-1].children += total
                self.events.append((label, start, total - frame.children))

        timed.__wrapped__ = fn
        return timed

    def seconds(self, lo: float, hi: float) -> dict[str, float]:
        """Exclusive seconds per label of the calls that started in [lo, hi)."""
        out: dict[str, float] = {}
        for label, start, excl in self.events:
            if lo <= start < hi:
                out[label] = out.get(label, 0.0) + excl
        return out


def timed_strategy(clock: Clock, base: type) -> type:
    """``base`` (FedSAMatch) with its four round hooks timed; configure_train marks a round start."""

    class TimedStrategy(base):
        def configure_train(self, server_round, *args, **kwargs):
            clock.round_start.setdefault(server_round, time.perf_counter())
            return clock.wrap("server_configure", super().configure_train)(server_round, *args, **kwargs)

        def configure_evaluate(self, *args, **kwargs):
            return clock.wrap("server_configure", super().configure_evaluate)(*args, **kwargs)

        def aggregate_train(self, *args, **kwargs):
            return clock.wrap("server_aggregate", super().aggregate_train)(*args, **kwargs)

        def aggregate_evaluate(self, *args, **kwargs):
            return clock.wrap("server_aggregate", super().aggregate_evaluate)(*args, **kwargs)

    return TimedStrategy


def timed_recorder(clock: Clock, base: type) -> type:
    """``base`` (RunRecorder) whose ``record`` is timed; its end is the end of the round."""

    class TimedRecorder(base):
        def record(self, server_round, *args, **kwargs):
            try:
                return clock.wrap("server_record", super().record)(server_round, *args, **kwargs)
            finally:
                clock.round_end[server_round] = time.perf_counter()

    return TimedRecorder


# (module, function name, label): wrapped while an in-process run lasts.
WRAPPED = (
    ("clients.client_app", "_session", "site_setup"),
    ("clients.client_app", "from_record", "client_decode"),
    ("clients.client_app", "unpack_record", "client_decode"),
    ("clients.client_app", "to_record", "client_encode"),
    ("clients.client_app", "pack_record", "client_encode"),
    ("clients.client_app", "train_round", "site_train"),
    ("clients.client_app", "evaluate_round", "evaluate"),
    ("server.strategy", "to_record", "server_encode"),
    ("server.strategy", "pack_record", "server_encode"),
    ("server.strategy", "Array", "server_encode"),
    ("server.strategy", "check_train_reply", "server_validate"),
    ("server.strategy", "check_evaluate_reply", "server_validate"),
    ("server.strategy", "aggregate_states", "server_aggregate"),
    ("server.server_app", "from_record", "server_record"),
)
BREAKDOWN = (
    "site_setup",
    "site_state",
    "client_decode",
    "client_encode",
    "server_configure",
    "server_encode",
    "server_validate",
    "server_aggregate",
    "server_record",
    "messaging_other",
)


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    import importlib

    import server.server_app as server_app

    with contextlib.ExitStack() as stack:
        for module_name, name, label in WRAPPED:
            module = importlib.import_module(module_name)
            stack.enter_context(mock.patch.object(module, name, clock.wrap(label, getattr(module, name))))
        stack.enter_context(
            mock.patch.object(server_app, "FedSAMatch", timed_strategy(clock, server_app.FedSAMatch))
        )
        stack.enter_context(
            mock.patch.object(server_app, "RunRecorder", timed_recorder(clock, server_app.RunRecorder))
        )
        yield


@dataclass
class SiteMessage:
    round: int
    node: int
    kind: str  # train / evaluate
    instruction: Message = field(repr=False)
    reply: Message = field(repr=False)


class SiteLog:
    """The ClientApp as the in-process grid calls it, keeping every instruction and reply."""

    def __init__(self, client_app: Callable) -> None:
        self.client_app = client_app
        self.messages: list[SiteMessage] = []

    def __call__(self, msg: Message, context) -> Message:
        reply = self.client_app(msg, context)
        r = int(msg.content["config"]["server-round"])
        self.messages.append(SiteMessage(r, msg.metadata.dst_node_id, msg.metadata.message_type, msg, reply))
        return reply


def content_sizes(content: RecordDict) -> dict[str, int]:
    total = {"tensor_bytes": 0, "float_bytes": 0, "int_bytes": 0, "payload_bytes": 0}
    for record in content.array_records.values():
        for key, value in record_sizes(record).items():
            if key in total:
                total[key] += value
    return total


def site_bytes(messages: list[SiteMessage]) -> dict[str, dict[str, int]]:
    """Per node: bytes received (instructions' arrays) and sent (replies' arrays)."""
    out: dict[str, dict[str, int]] = {}
    for m in messages:
        row = out.setdefault(str(m.node), {"messages_down": 0})
        row["messages_down"] += 1
        for direction, content in (("down", m.instruction.content), ("up", m.reply.content)):
            for key, value in content_sizes(content).items():
                row[f"{direction}_{key}"] = row.get(f"{direction}_{key}", 0) + value
    return out


def inprocess_round(clock: Clock, r: int, messages: list[SiteMessage]) -> dict:
    lo = clock.round_end.get(r - 1, clock.round_start[1])
    hi = clock.round_end[r]
    excl = clock.seconds(lo, hi)
    train = sum(float(m.reply.content["metrics"]["train-seconds"]) for m in messages if m.kind == "train")
    evaluate = excl.pop("evaluate", 0.0)
    excl["site_state"] = excl.pop("site_train", 0.0) - train
    wall = hi - lo
    overhead = wall - train - evaluate
    breakdown = {f"{k}_s": excl.get(k, 0.0) for k in BREAKDOWN[:-1]}
    breakdown["messaging_other_s"] = overhead - sum(breakdown.values())
    per_site = site_bytes(messages)
    return {
        "round": r,
        "evaluated": any(m.kind == "evaluate" for m in messages),
        "wall_s": wall,
        "train_s": train,
        "evaluate_s": evaluate,
        "overhead_s": overhead,
        "breakdown": breakdown,
        "bytes_per_site": per_site,
        "bytes_source": "measured",
    }


def run_inprocess_case(case: Case, scale: Scale, workdir: Path) -> dict:
    from clients.client_app import app as client_app
    from federation.inprocess import run_inprocess
    from server.server_app import app as server_app

    run_config = {**scale.run_config(case), "data.format": "phantom-cardiac", "out-dir": str(workdir / "run")}
    nodes = [{"partition-id": i, "num-partitions": scale.sites} for i in range(scale.sites)]
    clear_sessions()  # round 1 builds every site's data, as in a fresh process
    clock, sites = Clock(), SiteLog(client_app)
    t0 = time.perf_counter()
    with instrumented(clock):
        run_inprocess(server_app, sites, run_config, nodes)
    total = time.perf_counter() - t0
    rounds = [
        inprocess_round(clock, r, [m for m in sites.messages if m.round == r])
        for r in sorted(clock.round_end)
    ]
    return {"rounds": rounds, "run_seconds": total, "waves": scale.sites}
