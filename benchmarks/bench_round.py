"""Benchmark: the federation's overhead per round (everything outside the sites' local training and
evaluation) and the bytes a site sends and receives per round.

Two parts (the payload part in ``round_payloads.py``, the in-process engine in ``round_inprocess.py``,
the cases and the tiny federation in ``round_cases.py``; the other engines, the summaries and the
command line here):

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
  difference of consecutive rounds' ``seconds``; the sites run concurrently and each phase waits for
  the slowest, so training and evaluation on the critical path = the slowest site's
  ``train-seconds`` / ``evaluate-seconds`` (the server's per-site reply metrics; with waves = sites /
  concurrent ClientApps above 1, or a results.json without per-site metrics, waves x the sites'
  means; ``overhead_mean_s`` is always the latter, this benchmark's measure until 2026-11-28). Their
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
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from benchmarks.round_cases import (  # noqa: E402
    ENGINES,
    FULL_CASES,
    GOAL_BYTES,
    GOAL_OVERHEAD_S,
    MB,
    METHODS,
    Case,
    Scale,
)
from benchmarks.round_inprocess import run_inprocess_case  # noqa: E402
from benchmarks.round_payloads import bench_payloads, payload_for  # noqa: E402
from deploy.cli import site_state_dir  # noqa: E402
from deploy.commands import run_config_arg  # noqa: E402
from deploy.node import RuntimeSettings  # noqa: E402
from deploy.procs import free_port, processes_with_env  # noqa: E402
from federation import pull_retry  # noqa: E402

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


TRAIN_SECONDS = "train-seconds"


def site_seconds(row: dict, phase: str, key: str) -> dict[str, float] | None:
    """A round's ``key`` seconds in ``phase`` ("train" / "evaluate") per accepted site, by node id
    (the server's ``<phase>-sites`` metrics); None when it has none for some site (a results.json
    from before 2026-11-28, or a reply without the key)."""
    sites = row.get(f"{phase}-sites", {}).get("metrics")
    if sites and all(key in m for m in sites.values()):
        return {node: float(m[key]) for node, m in sites.items()}
    return None


def mean_seconds(row: dict, phase: str, key: str) -> float | None:
    """The server's mean of the sites' ``key`` seconds in ``phase`` (FedAvg's, weighted by
    ``num-examples``); None when the round has none."""
    value = row.get(phase, {}).get(key)
    return None if value is None else float(value)


def slowest(parts: list[dict[str, float]]) -> list[float]:
    """The parts of one phase's critical path: those of the site whose parts sum to the most (a phase
    waits for its last reply); 0 for a part that site lacks (e.g. its training was rejected)."""
    nodes = sorted(set().union(*parts))
    if not nodes:
        return [0.0] * len(parts)
    worst = max(nodes, key=lambda n: sum(p.get(n, 0.0) for p in parts))
    return [p.get(worst, 0.0) for p in parts]


def results_rounds(results: dict, waves: int, evaluate_key: str = "evaluate-seconds") -> list[dict]:
    """Per round from a results.json: wall (``seconds`` differences); train and evaluate on the
    round's critical path: each phase waits for its slowest site (:func:`slowest`), so a train phase
    counts the slowest site's ``train-seconds`` and an evaluate phase the slowest site's
    ``evaluate-seconds`` (evaluate None when a round evaluated but the replies carry no seconds);
    overhead = the rest. Under evaluate-then-train a round's training runs in the previous round's
    evaluation phase, in the same message as that evaluation: that phase counts the site whose
    evaluation and training together took longest. With ``waves`` > 1 (sites taking turns) or
    without per-site seconds, waves x the server's means instead; ``overhead_mean_s`` is always that
    (this benchmark's measure until 2026-11-28)."""
    rows, previous = [], 0.0
    listed = results.get("rounds", [])
    ridden = {  # rounds whose train instructions went out with the previous round's evaluation
        row["round"] for row in listed if "with-evaluation-of-round" in row.get("train-instructions", {})
    }
    by_round = {row["round"]: row for row in listed}
    for row in listed:
        wall = row["seconds"] - previous
        previous = row["seconds"]
        r = row["round"]
        # the round's own train phase; its evaluate phase; the next round's training sent with it
        phases = [
            (row, "train", TRAIN_SECONDS) if r not in ridden else None,
            (row, "evaluate", evaluate_key),
            (by_round[r + 1], "train", TRAIN_SECONDS) if r + 1 in ridden else None,
        ]
        means = [None if p is None else mean_seconds(*p) for p in phases]
        mean_path = [waves * (m or 0.0) for m in means]
        sites = [{} if m is None else site_seconds(*p) for p, m in zip(phases, means, strict=True)]
        if waves == 1 and all(s is not None for s in sites):
            (own_train,) = slowest(sites[:1])
            evaluate, carried_train = slowest(sites[1:])
        else:
            own_train, evaluate, carried_train = mean_path
        train = own_train + carried_train
        if means[1] is None:  # None: evaluated without seconds; 0: not evaluated
            evaluate = None if "evaluate" in row else 0.0
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
                "overhead_mean_s": wall - sum(mean_path),
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
        runtime=RuntimeSettings(poll_interval=case.poll_s, reply_check=case.reply_s, warm=case.warm),
        sites_from=scale.sites_from,
        sites_root=scale.sites_root,
        # Real sites encode their slices for SAM in the first message: minutes on this CPU.
        round_timeout=timeout if scale.sites_from else RehearsalConfig.round_timeout,
    )
    # The rehearsal's own data (phantom patients as NIfTI files, or the manifest's) and settings, then ours.
    overrides = scale.run_config(case)
    rehearsal = Rehearsal(workdir / "deploy", cfg)
    rehearsal.procs.env[pull_retry.ENV] = f"{case.pull_retry_s:g}"  # every process the rehearsal starts
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
    node = replace(rehearsal.site_specs[site], state_dir=state).node_items()
    return {
        "rounds": results_rounds(outcome.results, waves=1),
        "run_seconds": total,
        "waves": 1,
        "returncode": outcome.returncode,
        "leftovers_running": leftovers,
        "log_tail": None if outcome.returncode == 0 else outcome.log[-3000:],
        "clientapp_cold_start": cold_start(rehearsal.out_dir / "config.json", node, cfg.threads),
        "clientapp_warm_processes": warm_processes(rehearsal.root / "logs"),
    }


WARM_EXIT = re.compile(r"warm server \d+: process \d+ exited (-?\d+) after ([\d.]+) s")


def warm_processes(log_dir: Path) -> dict | None:
    """The ClientApp processes the sites' warm servers forked (deploy/warm.py logs each one's exit
    in its SuperNode's log): how many, how many failed, median and max seconds from fork to exit
    (the message's whole local work: training and evaluation included). None without any."""
    ends = [
        m.groups()
        for log in sorted(log_dir.glob("supernode-*.log"))
        for m in WARM_EXIT.finditer(log.read_text())
    ]
    if not ends:
        return None
    seconds = [float(s) for _, s in ends]
    failed = sum(code != "0" for code, _ in ends)
    return {
        "count": len(ends),
        "failed": failed,
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
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
        "overhead_mean_s": med(lambda r: r.get("overhead_mean_s")),
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
    return {
        **asdict(case),
        "name": case.name,
        "supernode": case.supernode,
        **run,
        "summary": summary,
        "goals": goals(summary),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def runs_of(cases: list[dict], key: str = "overhead_s") -> dict[str, list[float]]:
    """Per case run more than once (``--runs``): the overhead (``key``) of each run (its warm rounds'
    median)."""
    overheads: dict[str, list[float]] = {}
    for c in cases:
        if c["summary"].get(key) is not None:
            overheads.setdefault(c["name"], []).append(c["summary"][key])
    return {name: values for name, values in overheads.items() if len(values) > 1}


def cases_table(cases: list[dict]) -> list[str]:
    lines = [
        "| engine | method | transport | packed | evaluate-then-train | SuperNode | round wall s | train s "
        "| evaluate s | overhead s | round 1 wall s | up MB / site | down MB / site |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        s = c["summary"]
        up, down = s.get("up_bytes_per_site"), s.get("down_bytes_per_site")
        joint = "yes" if c.get("evaluate_then_train") else "no"
        node = c.get("supernode") or "-"  # rows from before deploy/node.py have none
        lines.append(
            f"| {c['engine']} | {c['method']} | {c['transport']} | {'yes' if c['pack'] else 'no'} | {joint} "
            f"| {node} "
            f"| {_fmt(s.get('wall_s'), '.2f')} | {_fmt(s.get('train_s'), '.2f')} "
            f"| {_fmt(s.get('evaluate_s'), '.2f')} | {_fmt(s.get('overhead_s'), '.2f')} "
            f"| {_fmt(s.get('round1_wall_s'), '.1f')} | {_fmt(up and up / MB, '.2f')} "
            f"| {_fmt(down and down / MB, '.2f')} |"
        )
    means = runs_of(cases, "overhead_mean_s")
    for name, overheads in runs_of(cases).items():
        line = (
            f"{name}: overhead median {statistics.median(overheads):.2f} s over {len(overheads)} runs "
            f"({min(overheads):.2f}-{max(overheads):.2f})"
        )
        if name in means:
            line += f"; with the sites' mean training: {statistics.median(means[name]):.2f} s"
        lines.append(line)
    for c in cases:
        if c.get("error"):
            lines.append(f"{c['name']}: failed: {c['error']}")
        if c.get("clientapp_warm_processes"):
            w = c["clientapp_warm_processes"]
            lines.append(
                f"{c['name']}: {w['count']} ClientApp processes forked warm ({w['failed']} failed), "
                f"fork to exit median {w['median_s']:.2f} s, max {w['max_s']:.2f} s"
            )
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


def select_cases(
    engines: list[str], quick: bool, methods: list[str] | None = None, only: str = ""
) -> list[Case]:
    """The full benchmark's cases of these engines and methods whose name contains ``only``."""
    if quick:
        return [Case("inprocess", "unimatch", "fp32"), Case("inprocess", "unimatch", "fp16")]
    chosen = [c for c in FULL_CASES if c.engine in engines and (not methods or c.method in methods)]
    return [c for c in chosen if only in c.name]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated: only cases of these methods (" + ", ".join(METHODS) + ")",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; quick 2)")
    parser.add_argument("--runs", type=int, default=1, help="run every case this many times, in turns")
    parser.add_argument("--only", default="", help='only cases whose name contains this (e.g. "then-train")')
    parser.add_argument("--sites", type=int, default=2, help="sites (default 2: one per core here)")
    parser.add_argument("--local-iterations", type=int, default=None, help="steps per round (2; quick 1)")
    parser.add_argument("--size", type=int, default=32, help="data.size of the sites' slices")
    parser.add_argument("--base-channels", type=int, default=16, help="U-Net width (16: the real one)")
    parser.add_argument(
        "--max-unlabeled", type=int, default=4, help="data.max_unlabeled: unlabeled slices per site"
    )
    parser.add_argument(
        "--sites-from",
        default="",
        help="deploy only: the sites' real data from this partition manifest (simulations/partition.py)",
    )
    parser.add_argument("--sites-root", default="", help="with --sites-from: the dataset's folder here")
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
    if args.sites_from and args.engines != ["deploy"]:
        parser.error("--sites-from: real sites are rehearsed by the deploy engine only (--engines deploy)")
    if args.sites_from and not Path(args.sites_from).is_file():
        parser.error(f"--sites-from {args.sites_from}: no such manifest file")
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
    scale = Scale(
        args.sites,
        args.rounds,
        args.local_iterations,
        args.size,
        args.base_channels,
        max_unlabeled=args.max_unlabeled,
        sites_from=args.sites_from,
        sites_root=args.sites_root,
    )
    cases = select_cases(args.engines, args.quick, args.methods, args.only)
    result = provenance("federation_round", __file__, args, argv) | {
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
        # --runs N: the cases in turn, N times over, so a drifting load on the machine meets them all
        for run in range(1, args.runs + 1):
            size = f"{scale.sites} sites x {scale.rounds} rounds x {scale.local_iterations} steps"
            for i, case in enumerate(cases):
                log(f"{case.name} (run {run} of {args.runs}): {size}")
                row = run_case(
                    case,
                    scale,
                    result["payloads"],
                    Path(work) / f"{run}_{i}_{case.name.replace(' ', '_')}",
                    args.timeout,
                )
                wall, over = (_fmt(row["summary"].get(k), ".2f") for k in ("wall_s", "overhead_s"))
                log(
                    f"  warm round {wall} s, overhead {over} s"
                    + (f"; {row['error']}" if "error" in row else "")
                )
                result["cases"].append({**row, "run": run})
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    result["load_average_1min"] = [load_before, round(os.getloadavg()[0], 2)]
    print(format_table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
