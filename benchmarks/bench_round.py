"""Benchmark: the federation's overhead per round (everything outside the sites' local training and
evaluation) and the bytes a site sends and receives per round.

Two parts:

* **payloads** (no federation run): for the U-Net 16-256 (``model.base_channels = 16``, the real
  width) with UniMatch, and with SAM-Match's LoRA adapters in both modes (``avg`` sends A and B,
  ``ffa`` only B), in fp32 and fp16 transport, unpacked and packed (``pack-arrays``): the tensors'
  bytes (float / integer), the serialised ArrayRecord, Flower's wire objects (the message deflated as
  Flower 1.42 pushes it: one object per record, Array and 5 MB chunk, deduplicated), and the median
  time of each (de)serialisation step of one state: site encode (``to_record`` [+ ``pack_record``]),
  site decode ([``unpack_record`` +] ``from_record``), server screening (``check_train_reply``:
  unpack, decode, keys, dtypes, finite values, update norm), aggregation (``aggregate_states`` over
  the sites) and Flower's message deflate / inflate. The states are the initial ones with noise
  added to every float tensor (a trained state: no two tensors alike, so no object is deduplicated
  that a real round would send).
* **engines**: a tiny federated run of the project's real ServerApp and ClientApp (phantom sites,
  a few local iterations at a small ``data.size``, the same U-Net width, federated evaluation every
  round), per round: wall time, the sites' training (``train-seconds``, the optimizer steps) and
  evaluation on the round's critical path, overhead = wall - training - evaluation, and bytes per
  site (serialised arrays, down: the train and evaluate instructions; up: the train reply; under
  ``keep-global``, the default, a train instruction that follows an evaluation carries no arrays).

  - ``inprocess``: :mod:`federation.inprocess`, sites one after the other (critical path = the sum
    over sites), no serialisation of Messages. Round wall = from the ServerApp's ``configure_train``
    (round 1) or the end of the previous round's checkpoint to the end of this round's. Calls of the
    apps are timed under labels (exclusive of labelled calls inside them, so no second counts twice;
    the functions are wrapped in the app modules' namespaces while the run lasts, no file is edited)
    and the overhead is split into: site setup (run-config parsing, session look-up; round 1 builds
    the site's data and trainer), site state (``train_round`` minus its steps: load the global
    state, re-seed, copy the state out), client decode / encode (ArrayRecord <-> tensors, packing),
    server configure (sampling, messages), server encode (transport cast, packing, the aggregate's
    ArrayRecord), server validate (reply screening: decode, keys, dtypes, finite values, norm),
    server aggregate (``aggregate_states``, metric means), server record (``results.json``,
    ``last.pt``, ``best.pt``) and the remainder (Flower Message objects, the strategy loop, logging:
    in-process "messaging"). Bytes are measured on the Messages each site received and sent.
  - ``flwr-run``: a real ``flwr run`` local simulation (Ray) through ``scripts/flwr_run.sh`` with a
    private FLWR_HOME and port; every process it starts is stopped (the script's own clean-up, then
    any process still carrying the private FLWR_HOME, by PID).
  - ``deploy``: the local Deployment Engine rehearsal (:mod:`deploy.rehearsal`: SuperLink with TLS
    and SuperNode authentication, one SuperNode process per site, whose SuperExec starts a
    ``flwr-clientapp`` process per message) on 127.0.0.1, packed and unpacked, and packed with
    ``evaluate-then-train`` (one message per site per round: the deployment's default); every
    process is stopped afterwards. Plus a probe of what each such ClientApp process pays before it
    trains: a fresh Python importing the app and building the site's session on the rehearsal's own
    site folder (median of 3). ``flwr-run`` also runs once with ``evaluate-then-train``.

  ``flwr-run`` and ``deploy`` are read from the run folder's ``results.json`` only: round wall = the
  difference of consecutive rounds' ``seconds``; the sites run concurrently, so training and
  evaluation on the critical path = waves x the sites' mean ``train-seconds`` / ``evaluate-seconds``
  (reply metrics; waves = sites / concurrent ClientApps, 1 when each site has a core). Their
  overhead is not broken down further (Ray's and Flower's HTTPS transports are not instrumented);
  their bytes per site are the payload part's for the same method, transport and packing.

Round 1 also builds every site's data and trainer (``flwr-run``: starts Ray and its actors), so the
summaries are medians over rounds 2.. ("warm"); round 1 is reported apart. Asserts nothing about
time; CPU timings on a shared machine are noisy (the 1-min load average before and after is kept).
Results, every round and the hardware go to ``--out`` (JSON); the tables are printed.

    python benchmarks/bench_round.py [--engines inprocess,flwr-run,deploy] [--methods unimatch,...]
        [--rounds 4] [--sites 2]
        [--local-iterations 2] [--size 32] [--base-channels 16] [--repeat 5] [--quick]
        [--out runs/bench_round.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.bench_step import hardware  # noqa: E402
from deploy.cli import site_state_dir  # noqa: E402
from deploy.commands import run_config_arg  # noqa: E402
from deploy.procs import free_port, processes_with_env  # noqa: E402
from federation.aggregate import aggregate_states  # noqa: E402
from federation.config import parse_run_config  # noqa: E402
from federation.inprocess import server_task_identity  # noqa: E402
from federation.local import clear_sessions, initial_state  # noqa: E402
from federation.packing import is_packed, pack_record, unpack_record  # noqa: E402
from federation.state import from_record, record_nbytes, shareable_keys, to_record  # noqa: E402
from federation.validate import UpdateRules, check_train_reply  # noqa: E402

ENGINES = ("inprocess", "flwr-run", "deploy")
# Run-config settings of each method (the U-Net is the same; SAM-Match adds LoRA on SAM's decoder).
METHODS = {
    "unimatch": {"method.name": "unimatch"},
    "samatch-avg": {"method.name": "samatch", "lora-mode": "avg"},
    "samatch-ffa": {"method.name": "samatch", "lora-mode": "ffa"},
}
MB = 1e6
GOAL_OVERHEAD_S = 2.0  # the performance issue's goals, per round and per site
GOAL_BYTES = 8 * MB
TRAIN_COUNTS = {"num-examples": 6.0, "num-labeled": 6.0, "num-unlabeled": 6.0}


@dataclass(frozen=True)
class Case:
    engine: str
    method: str = "unimatch"  # a key of METHODS
    transport: str = "fp32"
    pack: bool = False
    evaluate_then_train: bool = False  # one message per site per round (federation/evaluate_then_train.py)

    @property
    def name(self) -> str:
        joint = " evaluate-then-train" if self.evaluate_then_train else ""
        return f"{self.engine} {self.method} {self.transport}{' packed' if self.pack else ''}{joint}"


# The full benchmark's runs; --quick keeps the first two in-process ones.
FULL_CASES = (
    Case("inprocess", "unimatch", "fp32"),
    Case("inprocess", "unimatch", "fp16"),
    Case("inprocess", "unimatch", "fp32", pack=True),
    Case("inprocess", "samatch-avg", "fp32"),
    Case("inprocess", "samatch-ffa", "fp32"),
    Case("flwr-run", "unimatch", "fp32"),
    Case("flwr-run", "unimatch", "fp16"),
    Case("flwr-run", "unimatch", "fp32", evaluate_then_train=True),
    Case("deploy", "unimatch", "fp32", pack=True),
    Case("deploy", "unimatch", "fp32"),
    # the deployment's default (deploy/commands.py)
    Case("deploy", "unimatch", "fp32", pack=True, evaluate_then_train=True),
    # a SAM-Match site: every message's fresh process also builds SAM (its embeddings cached on disk)
    Case("deploy", "samatch-avg", "fp32", pack=True, evaluate_then_train=True),
)


@dataclass(frozen=True)
class Scale:
    """The tiny federation the engines run: real U-Net width, little data, few steps."""

    sites: int = 2
    rounds: int = 4
    local_iterations: int = 2
    size: int = 32
    base_channels: int = 16
    batch: int = 2
    max_unlabeled: int = 4

    def run_config(self, case: Case) -> dict[str, object]:
        return {
            "num-server-rounds": self.rounds,
            "local-iterations": self.local_iterations,
            "min-available-nodes": self.sites,
            "min-train-nodes": self.sites,
            "min-evaluate-nodes": self.sites,
            "evaluate-every": 1,
            "transport": case.transport,
            "pack-arrays": case.pack,
            "evaluate-then-train": case.evaluate_then_train,
            "data.size": self.size,
            "data.labeled": 1,
            "data.max_unlabeled": self.max_unlabeled,
            "data.max_val_cases": 1,
            "model.base_channels": self.base_channels,
            "schedule.batch_size": self.batch,
            "device": "cpu",
            **METHODS[case.method],
        }


# ---- sizes and the payload part -------------------------------------------------------------------


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


# ---- in-process engine ------------------------------------------------------------------------------


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


# ---- flwr run and deployment engines ----------------------------------------------------------------


def stop_leftovers(marker: str) -> list[int]:
    """Kill, by PID, processes still carrying ``marker`` after a grace period; returns them."""
    leftovers: list[int] = []
    for _ in range(20):
        leftovers = processes_with_env(marker)
        if not leftovers:
            break
        time.sleep(0.5)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def results_rounds(results: dict, waves: int, evaluate_key: str = "evaluate-seconds") -> list[dict]:
    """Per round from a results.json: wall (``seconds`` differences); train and evaluate on the
    round's critical path (``waves`` x the sites' mean ``train-seconds`` / ``evaluate-seconds``;
    evaluate None when a round evaluated but the replies carry no seconds); overhead = the rest.
    Under evaluate-then-train a round's training runs in the previous round's evaluation phase, so it
    counts on that round's critical path."""
    rows, previous = [], 0.0
    listed = results.get("rounds", [])
    ridden = {  # rounds whose train instructions went out with the previous round's evaluation
        row["round"] for row in listed if "with-evaluation-of-round" in row.get("train-instructions", {})
    }
    seconds_of = {row["round"]: float(row.get("train", {}).get("train-seconds", 0.0)) for row in listed}
    for row in listed:
        wall = row["seconds"] - previous
        previous = row["seconds"]
        r = row["round"]
        train = waves * ((r not in ridden) * seconds_of[r] + (r + 1 in ridden) * seconds_of.get(r + 1, 0.0))
        seconds = row.get("evaluate", {}).get(evaluate_key, None if "evaluate" in row else 0.0)
        evaluate = None if seconds is None else waves * float(seconds)
        rows.append(
            {
                "round": row["round"],
                "evaluated": "evaluate" in row,
                # keep-global: whether any site's train instruction carried the arrays this round
                "train_arrays_down": row.get("train-instructions", {"with-arrays": 1})["with-arrays"] > 0,
                "train_with_evaluation": r in ridden,  # its instruction was counted in round r - 1
                "wall_s": wall,
                "train_s": train,
                "evaluate_s": evaluate,
                "overhead_s": wall - train - (evaluate or 0.0),
                "breakdown": None,
                "bytes_source": "computed",
            }
        )
    return rows


def ray_waves(sites: int) -> int:
    """scripts/flwr_run.sh gives each ClientApp cores // sites CPUs (at least 1) of ``nproc`` cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slots = max(1, cores // max(1, cores // sites))
    return math.ceil(sites / slots)


def run_flwr_case(case: Case, scale: Scale, workdir: Path, timeout: float) -> dict:
    home, out = workdir / "flwr_home", workdir / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "NUM_HOSPITALS": str(scale.sites),
        "RUN_TIMEOUT": str(int(timeout)),
    }
    settings = {**scale.run_config(case), "data.format": "phantom-cardiac", "out-dir": str(out)}
    argv = ["bash", str(REPO / "scripts" / "flwr_run.sh"), "-c", run_config_arg(settings)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops the SuperLink it started
        log, _ = proc.communicate()
    finally:
        leftovers = stop_leftovers(str(home))
    total = time.perf_counter() - t0
    (workdir / "flwr_run.log").write_text(log)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    waves = ray_waves(scale.sites)
    return {
        "rounds": results_rounds(results, waves),
        "run_seconds": total,
        "waves": waves,
        "returncode": proc.returncode,
        "leftovers_killed": leftovers,
        "log_tail": None if proc.returncode == 0 else log[-3000:],
    }


def run_deploy_case(case: Case, scale: Scale, workdir: Path, timeout: float) -> dict:
    from deploy.rehearsal import Rehearsal, RehearsalConfig

    cfg = RehearsalConfig(
        sites=scale.sites,
        rounds=scale.rounds,
        local_iterations=scale.local_iterations,
        size=scale.size,
        base_channels=scale.base_channels,
        evaluate_every=1,
        timeout=timeout,
        threads=1,
    )
    # The rehearsal's own data (phantom patients as NIfTI files) and settings, then ours.
    overrides = scale.run_config(case)
    rehearsal = Rehearsal(workdir / "deploy", cfg)
    t0 = time.perf_counter()
    outcome, leftovers = None, []
    try:
        rehearsal.up()
        outcome = rehearsal.finish_run(rehearsal.start_run(**overrides))
    finally:
        rehearsal.stop()
        leftovers = rehearsal.procs.leftovers()
    total = time.perf_counter() - t0
    site = rehearsal.sites[0]
    # The site's folder as its SuperNode had it by default (deploy.cli.site_state_dir): the probe then
    # finds the SAM embeddings that the run cached, as the run's later messages did.
    state = site_state_dir("", str(rehearsal.site_homes[site]))
    node = {
        "data-root": str(rehearsal.data_roots[site]),
        "data-format": "nifti",
        "site-name": site,
        "state-dir": state,
    }
    return {
        "rounds": results_rounds(outcome.results, waves=1),
        "run_seconds": total,
        "waves": 1,
        "returncode": outcome.returncode,
        "leftovers_running": leftovers,
        "log_tail": None if outcome.returncode == 0 else outcome.log[-3000:],
        "clientapp_cold_start": cold_start(rehearsal.out_dir / "config.json", node, cfg.threads),
    }


# What a fresh ClientApp process does before it can train: start Python, import the app (torch, flwr,
# samatch), build the site's data and trainer. argv: the run's config.json, the node config (JSON).
COLD_START = """
import json, sys, time
t0 = time.perf_counter()
import clients.client_app
t1 = time.perf_counter()
from federation.config import FederationConfig, site_from_node_config
from federation.local import get_session
from samatch.config import TrainConfig
cfg = TrainConfig.load(sys.argv[1])
get_session(site_from_node_config(json.loads(sys.argv[2]), cfg, FederationConfig()), cfg)
print(json.dumps({"import_s": t1 - t0, "session_s": time.perf_counter() - t1}))
"""


def cold_start(config_json: Path, node_config: dict, threads: int, repeat: int = 3) -> dict | None:
    """Median seconds of a fresh process importing the ClientApp and building the site's session
    (the deployment starts a ClientApp process per message); None when the run left no config."""
    if not config_json.is_file():
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", COLD_START, str(config_json), json.dumps(node_config)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        rows.append(
            {**json.loads(res.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}
        )
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


# ---- summary, table, command line -------------------------------------------------------------------


def computed_bytes(payload: dict | None, rounds: list[dict]) -> None:
    """Bytes per site of the engines that are not measured: one reply up, one state down per phase
    (evaluate every round here) whose instruction carried arrays (the server's ``train-instructions``
    count: under keep-global a train instruction after an evaluation carries none; under
    evaluate-then-train the evaluation's message is the next round's train instruction)."""
    if payload is None:
        return
    for row in rounds:
        own_train = not row.get("train_with_evaluation", False)
        with_arrays = row["evaluated"] + (own_train and row["train_arrays_down"])
        row["bytes_per_site"] = {
            "all": {
                "messages_down": own_train + row["evaluated"],
                "down_tensor_bytes": with_arrays * payload["tensor_bytes"],
                "down_payload_bytes": with_arrays * payload["payload_bytes"],
                "up_tensor_bytes": payload["tensor_bytes"],
                "up_payload_bytes": payload["payload_bytes"],
            }
        }


def summarize(rounds: list[dict]) -> dict:
    """Medians over the warm rounds (2..; all when there is one), round 1 apart."""
    warm = [r for r in rounds if r["round"] > 1] or rounds
    if not warm:
        return {}

    def med(get) -> float | None:
        values = [get(r) for r in warm]
        return None if any(v is None for v in values) else statistics.median(values)

    sites = list(warm[0].get("bytes_per_site", {}).values())
    out = {
        "warm_rounds": [r["round"] for r in warm],
        "wall_s": med(lambda r: r["wall_s"]),
        "train_s": med(lambda r: r["train_s"]),
        "evaluate_s": med(lambda r: r["evaluate_s"]),
        "overhead_s": med(lambda r: r["overhead_s"]),
        "round1_wall_s": rounds[0]["wall_s"],
        "round1_overhead_s": rounds[0]["overhead_s"],
        "up_bytes_per_site": max((s["up_payload_bytes"] for s in sites), default=None),
        "down_bytes_per_site": max((s["down_payload_bytes"] for s in sites), default=None),
    }
    if warm[0]["breakdown"] is not None:
        out["breakdown"] = {k: med(lambda r, k=k: r["breakdown"][k]) for k in warm[0]["breakdown"]}
    return out


def goals(summary: dict) -> dict:
    def below(value, limit):
        return None if value is None else value < limit

    return {
        "overhead_below_2s": below(summary.get("overhead_s"), GOAL_OVERHEAD_S),
        "up_below_8MB": below(summary.get("up_bytes_per_site"), GOAL_BYTES),
        "down_below_8MB": below(summary.get("down_bytes_per_site"), GOAL_BYTES),
    }


def run_case(case: Case, scale: Scale, payloads: list[dict], workdir: Path, timeout: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    engine = {"inprocess": run_inprocess_case, "flwr-run": run_flwr_case, "deploy": run_deploy_case}
    args = (case, scale, workdir) if case.engine == "inprocess" else (case, scale, workdir, timeout)
    try:
        run = engine[case.engine](*args)
    except Exception as exc:  # an engine that cannot run (e.g. a broken deployment) is reported, not fatal
        run = {"rounds": [], "error": f"{type(exc).__name__}: {exc}"}
    if case.engine != "inprocess":
        computed_bytes(payload_for(payloads, case), run["rounds"])
    summary = summarize(run["rounds"])
    return {**asdict(case), "name": case.name, **run, "summary": summary, "goals": goals(summary)}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cases_table(cases: list[dict]) -> list[str]:
    lines = [
        "| engine | method | transport | packed | evaluate-then-train | round wall s | train s | evaluate s "
        "| overhead s | round 1 wall s | up MB / site | down MB / site |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        s = c["summary"]
        up, down = s.get("up_bytes_per_site"), s.get("down_bytes_per_site")
        joint = "yes" if c.get("evaluate_then_train") else "no"
        lines.append(
            f"| {c['engine']} | {c['method']} | {c['transport']} | {'yes' if c['pack'] else 'no'} | {joint} "
            f"| {_fmt(s.get('wall_s'), '.2f')} | {_fmt(s.get('train_s'), '.2f')} "
            f"| {_fmt(s.get('evaluate_s'), '.2f')} | {_fmt(s.get('overhead_s'), '.2f')} "
            f"| {_fmt(s.get('round1_wall_s'), '.1f')} | {_fmt(up and up / MB, '.2f')} "
            f"| {_fmt(down and down / MB, '.2f')} |"
        )
    for c in cases:
        if c.get("error"):
            lines.append(f"{c['name']}: failed: {c['error']}")
        if c.get("clientapp_cold_start"):
            cold = c["clientapp_cold_start"]
            lines.append(
                f"{c['name']}: a fresh ClientApp process: {cold['process_s']:.1f} s (imports "
                f"{cold['import_s']:.1f} s, site session {cold['session_s']:.2f} s)"
            )
    return lines


def breakdown_table(cases: list[dict]) -> list[str]:
    split = [c for c in cases if c["summary"].get("breakdown")]
    if not split:
        return []
    keys = list(split[0]["summary"]["breakdown"])
    lines = ["| in-process overhead, ms per round | " + " | ".join(k[:-2] for k in keys) + " |"]
    lines.append("|---|" + "---|" * len(keys))
    for c in split:
        b = c["summary"]["breakdown"]
        lines.append(f"| {c['name']} | " + " | ".join(f"{1e3 * b[k]:.0f}" for k in keys) + " |")
    return lines


def payload_table(payloads: list[dict]) -> list[str]:
    lines = [
        "| method | transport | packed | tensors | float MB | int B | serialised MB | wire MB (objects) "
        "| site encode ms | site decode ms | server validate ms | aggregate ms | wire deflate ms "
        "| wire inflate ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in payloads:
        lines.append(
            f"| {p['method']} | {p['transport']} | {'yes' if p['pack'] else 'no'} | {p['tensors']} "
            f"| {p['float_bytes'] / MB:.3f} | {p['int_bytes']} | {p['payload_bytes'] / MB:.3f} "
            f"| {p['wire_bytes'] / MB:.3f} ({p['wire_objects']}) | {p['site_encode_ms']:.1f} "
            f"| {p['site_decode_ms']:.1f} | {p['server_validate_ms']:.1f} | {p['aggregate_ms']:.1f} "
            f"| {p['wire_deflate_ms']:.1f} | {p['wire_inflate_ms']:.1f} |"
        )
    return lines


def format_table(result: dict) -> str:
    parts = [
        cases_table(result["cases"]),
        breakdown_table(result["cases"]),
        payload_table(result["payloads"]),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p)


def select_cases(engines: list[str], quick: bool, methods: list[str] | None = None) -> list[Case]:
    if quick:
        return [Case("inprocess", "unimatch", "fp32"), Case("inprocess", "unimatch", "fp16")]
    return [c for c in FULL_CASES if c.engine in engines and (not methods or c.method in methods)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated: only cases of these methods (" + ", ".join(METHODS) + ")",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; quick 2)")
    parser.add_argument("--sites", type=int, default=2, help="sites (default 2: one per core here)")
    parser.add_argument("--local-iterations", type=int, default=None, help="steps per round (2; quick 1)")
    parser.add_argument("--size", type=int, default=32, help="data.size of the sites' slices")
    parser.add_argument("--base-channels", type=int, default=16, help="U-Net width (16: the real one)")
    parser.add_argument("--repeat", type=int, default=None, help="payload timing repeats (5; quick 1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on one flwr-run / deploy run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process (1, as a deployed site; 0: torch's)",
    )
    parser.add_argument("--quick", action="store_true", help="tests: in-process only, 2 rounds of 1 step")
    parser.add_argument("--keep", type=Path, default=None, help="keep run folders and logs here")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_round.json"))
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        parser.error(f"--engines: expected some of {ENGINES}, got {args.engines!r}")
    args.engines = ["inprocess"] if args.quick else engines
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in args.methods):
        parser.error(f"--methods: expected some of {list(METHODS)}, got {args.methods!r}")
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.local_iterations = args.local_iterations or (1 if args.quick else 2)
    args.repeat = args.repeat or (1 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = Scale(args.sites, args.rounds, args.local_iterations, args.size, args.base_channels)
    cases = select_cases(args.engines, args.quick, args.methods)
    result = {
        "benchmark": "federation_round",
        "command": "python benchmarks/bench_round.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware(),
        "scale": asdict(scale),
        "goals": {"overhead_s": GOAL_OVERHEAD_S, "bytes_per_site": GOAL_BYTES},
    }
    load_before = round(os.getloadavg()[0], 2)
    t_start = time.perf_counter()
    log = functools.partial(print, flush=True)
    result["payloads"] = bench_payloads(list(METHODS), args.base_channels, args.sites, args.repeat, log)
    result["cases"] = []
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_round-")))
        for i, case in enumerate(cases):
            log(f"{case.name}: {scale.sites} sites x {scale.rounds} rounds x {scale.local_iterations} steps")
            row = run_case(
                case,
                scale,
                result["payloads"],
                Path(work) / f"{i}_{case.name.replace(' ', '_')}",
                args.timeout,
            )
            wall, over = (_fmt(row["summary"].get(k), ".2f") for k in ("wall_s", "overhead_s"))
            log(f"  warm round {wall} s, overhead {over} s" + (f"; {row['error']}" if "error" in row else ""))
            result["cases"].append(row)
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    result["load_average_1min"] = [load_before, round(os.getloadavg()[0], 2)]
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
