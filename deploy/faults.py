"""Fault drills on a loopback deployment (and one in process), each returning what it checked.

Every drill builds its own :class:`deploy.rehearsal.Rehearsal` under a folder, injects one fault,
and compares the outcome with a fault-free federation of the same sites and seeds run in this
process (:func:`inprocess_run`, the same ServerApp and ClientApp code). ``python -m deploy.faults
--out FILE`` runs them all and writes the table of docs/reliability.md; tests/test_faults_*.py
run them one by one with assertions. Every process a drill starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, installed with flwr
    import tomli as tomllib

from deploy.commands import DEPLOY_RUN_CONFIG, REPO
from deploy.rehearsal import Rehearsal, RehearsalConfig

# Fault runs skip federated evaluation (one phase less per run); the final model is evaluated on
# the sites' validation cases in this process instead, as the federated evaluation would.
NO_EVAL = {"fraction-evaluate": 0.0}

# The drills' federations (tests use these; `--local-iterations` trains longer for the report).
# Kill: a SIGKILLed node stays "online" at the SuperLink for up to 60 s (two 30 s heartbeats), then
# the SuperLink answers its pending message with a "node unavailable" error. With a 60 s straggler
# timeout round 1 ends by then at the latest, and round 2 waits (min-available-nodes = all sites) for
# the restarted node: the rejoin is certain, not a race.
KILL_CFG = RehearsalConfig(rounds=2, min_train_replies=2, straggler_timeout=60.0, round_timeout=180.0)
RESTART_CFG = RehearsalConfig(sites=2, rounds=2)
BAD_DATA_CFG = RehearsalConfig(rounds=1, min_train_replies=1)
POISON_CFG = RehearsalConfig(rounds=3)


@dataclass
class Drill:
    fault: str
    happened: str = ""
    rounds: list[int] = field(default_factory=list)
    dice: float | None = None
    baseline_dice: float | None = None
    seconds: float = 0.0
    checks: dict = field(default_factory=dict)

    def row(self) -> str:
        dice = "-" if self.dice is None else f"{self.dice:.4f}"
        base = "-" if self.baseline_dice is None else f"{self.baseline_dice:.4f}"
        return f"| {self.fault} | {self.happened} | {self.rounds} | {dice} | {base} | {self.seconds:.0f} s |"

    def show(self) -> None:
        print(f"[{self.fault}] {self.happened}", flush=True)
        for key, value in self.checks.items():
            print(f"    checked {key}: {value}", flush=True)
        print(
            f"    rounds {self.rounds}, final Dice {self.dice} vs fault-free {self.baseline_dice}", flush=True
        )


# ---- fault-free reference, in process -----------------------------------------------------------------


@contextmanager
def torch_threads(n: int):
    """Torch threads of this process while in-process runs and evaluations happen: the same count
    as a deployment's ClientApps (``--threads``), so float results match theirs."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def node_configs(reh: Rehearsal) -> list[dict]:
    """The node configs of the rehearsal's SuperNodes, as Flower hands them to the ClientApp."""
    return [reh.site_specs[s].node_items() for s in reh.sites]


def app_defaults() -> dict:
    """``[tool.flwr.app.config]`` of pyproject.toml, flat: what `flwr run` starts from."""
    from flwr.common.config import flatten_dict

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def run_settings(reh: Rehearsal, out_dir: Path, **overrides: object) -> dict:
    """The run config a deployment run of ``reh`` gets (defaults, then its -c settings)."""
    return {
        **app_defaults(),
        **reh.run_config(),
        **DEPLOY_RUN_CONFIG,
        "out-dir": str(out_dir),
        **overrides,
    }


def inprocess_run(reh: Rehearsal, out_dir: Path, **overrides: object) -> dict:
    """The same federation, fault-free, in this process; returns its last.pt payload."""
    import torch

    from clients.client_app import app as client_app
    from federation.inprocess import run_inprocess
    from federation.local import clear_sessions
    from server.server_app import app as server_app

    clear_sessions()
    with torch_threads(reh.cfg.threads):
        run_inprocess(server_app, client_app, run_settings(reh, out_dir, **overrides), node_configs(reh))
    return torch.load(Path(out_dir) / "last.pt", map_location="cpu", weights_only=False)


def global_dice(reh: Rehearsal, state: dict, sites: list[str] | None = None) -> float:
    """Mean validation Dice of a global state over ``sites`` (default all), weighted by their
    validation cases (what the federated evaluation reports)."""
    from federation.config import parse_run_config, site_from_node_config
    from federation.local import evaluate_round, get_session

    cfg, fed = parse_run_config({**app_defaults(), **reh.run_config()})
    total, weight = 0.0, 0
    for nc in node_configs(reh):
        if sites is not None and nc["site-name"] not in sites:
            continue
        session = get_session(site_from_node_config(nc, cfg, fed), cfg)
        n = len(session.trainer.data.val)
        with torch_threads(reh.cfg.threads):
            total += n * evaluate_round(session, state, {})["dice_mean"]
        weight += n
    return total / weight


def _last_state(reh: Rehearsal) -> dict:
    import torch

    return torch.load(reh.out_dir / "last.pt", map_location="cpu", weights_only=False)["method"]


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def _finish(reh: Rehearsal, drill: Drill, t0: float) -> Drill:
    drill.checks["stragglers killed at stop"] = reh.stop()
    drill.checks["processes left"] = reh.procs.leftovers()
    drill.seconds = time.monotonic() - t0
    drill.show()
    return drill


# ---- drills on loopback -----------------------------------------------------------------------------------


def supernode_killed(
    root: Path, cfg: RehearsalConfig | None = None, victim_index: int = -1, compare: bool = True
) -> Drill:
    """SIGKILL one SuperNode (and its ClientApp) while it trains round 1; its supervisor restarts
    it. The round must finish with the other sites within the straggler timeout, and the site must
    take part again in a later round."""
    cfg = cfg or KILL_CFG
    reh, t0 = Rehearsal(root, cfg), time.monotonic()
    drill = Drill("SuperNode killed mid-round (SIGKILL), restarted by its supervisor")
    try:
        reh.up()
        victim = reh.sites[victim_index]
        run = reh.start_run(**NO_EVAL)
        log = reh.procs.procs[f"supernode-{victim}"]
        _wait_for(lambda: "Receiving: train message" in log.log_text(), 300, f"{victim} to receive round 1")
        time.sleep(1.0)  # its ClientApp is training now
        killed_at = time.monotonic()
        killed = reh.procs.kill(f"supernode-{victim}", include_self=False)
        bound = cfg.round_timeout + 60
        _wait_for(lambda: reh.results().get("rounds") or not run.running(), bound, "round 1 to end")
        round1_after_kill = time.monotonic() - killed_at
        out = reh.finish_run(run)
        rounds = out.results.get("rounds", [])
        victim_id = reh.node_ids[victim]
        accepted = [r["train-sites"]["accepted"] for r in rounds]
        rejoined = [r["round"] for r in rounds if victim_id in r["train-sites"]["accepted"]]
        drill.rounds = out.rounds
        drill.checks.update(
            {
                "run exit code": out.returncode,
                "killed pids": killed,
                "round 1 accepted sites": len(accepted[0]) if accepted else 0,
                "round 1 finished s after the kill": round(round1_after_kill, 1),
                "rounds the killed site took part in again": rejoined,
                "SuperNode connections of the killed site": reh.connections(victim),
                "failed replies by round": [r["train-sites"]["failed"] for r in rounds],
            }
        )
        dead = (
            "the SuperLink reported it unavailable"
            if rounds and rounds[0]["train-sites"]["failed"]
            else "no reply"
        )
        drill.happened = (
            f"round 1 aggregated {len(accepted[0]) if accepted else 0} of {len(reh.sites)} sites "
            f"{round1_after_kill:.0f} s after the kill ({dead}); the site rejoined in round(s) {rejoined}"
        )
        if compare:
            _evaluate(reh, drill)
    finally:
        _finish(reh, drill, t0)
    return drill


def superlink_restarted(root: Path, cfg: RehearsalConfig | None = None) -> Drill:
    """SIGKILL the SuperLink with its ServerApp after round 1, start it again with the same state
    database and relaunch the same `deploy run`: the run must continue at round 2 and end with the
    model of an uninterrupted run."""
    cfg = cfg or RESTART_CFG
    reh, t0 = Rehearsal(root, cfg), time.monotonic()
    drill = Drill("SuperLink + ServerApp killed (SIGKILL) after round 1, restarted, run relaunched")
    try:
        reh.up()
        first = reh.start_run(**NO_EVAL)
        _wait_for(lambda: (reh.out_dir / "last.pt").is_file(), cfg.timeout, "round 1 to be saved")
        killed = reh.procs.kill("superlink")
        interrupted = reh.finish_run(first, wait=60)
        reh.start_superlink()
        second = reh.finish_run(reh.start_run(**NO_EVAL))
        drill.rounds = second.rounds
        drill.checks.update(
            {
                "killed pids": killed,
                "first launch exit code (interrupted)": interrupted.returncode,
                "rounds saved before the kill": interrupted.rounds,
                "relaunch exit code": second.returncode,
                "relaunch resumed at round": _resumed_at(second.log),
                "SuperNode connections per site (1 = reconnected without restart)": {
                    s: reh.connections(s) for s in reh.sites
                },
            }
        )
        baseline = inprocess_run(reh, reh.root / "baseline", **NO_EVAL)
        drill.checks["max |w - w_fault_free|"] = _max_abs_diff(_last_state(reh), baseline["method"])
        drill.happened = (
            f"first launch stopped with exit {interrupted.returncode} after round(s) {interrupted.rounds}; "
            f"the relaunch resumed at round {drill.checks['relaunch resumed at round']} and completed"
        )
        drill.dice = global_dice(reh, _last_state(reh))
        drill.baseline_dice = global_dice(reh, baseline["method"])
    finally:
        _finish(reh, drill, t0)
    return drill


def bad_site_data(root: Path, cfg: RehearsalConfig | None = None, compare: bool = True) -> Drill:
    """Site B's data folder is missing, site C's folder holds a truncated NIfTI: both must reply
    with an error naming the problem, site A's update alone must be aggregated, the run completes."""
    cfg = cfg or BAD_DATA_CFG
    reh, t0 = Rehearsal(root, cfg), time.monotonic()
    drill = Drill("site data folder missing (B) / corrupt file (C)")
    try:
        reh.prepare()
        good, missing, corrupt = reh.sites[0], reh.sites[1], reh.sites[2]
        if compare:  # before the damage
            baseline = inprocess_run(reh, reh.root / "baseline", **NO_EVAL)
            drill.baseline_dice = global_dice(reh, baseline["method"], [good])
        missing_root = reh.data_roots[missing].parent / "not-mounted"
        broken = sorted((reh.data_roots[corrupt] / "imagesTr").iterdir())[2]
        broken.write_bytes(broken.read_bytes()[:100])  # an interrupted copy
        reh.start_superlink()
        for site in reh.sites:
            reh.register(site)
        reh.start_site(good)
        reh.start_site(missing, data_root=missing_root)
        reh.start_site(corrupt)
        reh.wait_connected(reh.sites)
        out = reh.finish_run(reh.start_run(**NO_EVAL))
        rounds = out.results.get("rounds", [])
        sites = rounds[0]["train-sites"] if rounds else {}
        failed = sites.get("failed", {})
        drill.rounds = out.rounds
        drill.checks.update(
            {
                "run exit code": out.returncode,
                "accepted": sites.get("accepted"),
                "expected accepted": [reh.node_ids[good]],
                f"error of {missing}": failed.get(str(reh.node_ids[missing])),
                f"error of {corrupt}": failed.get(str(reh.node_ids[corrupt])),
                "missing folder": str(missing_root),
                "corrupt file": str(broken),
            }
        )
        drill.happened = (
            f"2 sites replied with errors naming the folder / file; round 1 aggregated {good} only"
        )
        if compare:
            drill.dice = global_dice(reh, _last_state(reh), [good])  # Dice on the readable site's cases
    finally:
        _finish(reh, drill, t0)
    return drill


def _resumed_at(log: str) -> int | None:
    import re

    m = re.search(r"resuming from \S+ at round (\d+)", log)
    return int(m.group(1)) if m else None


def _evaluate(reh: Rehearsal, drill: Drill) -> None:
    if (reh.out_dir / "last.pt").is_file():
        drill.dice = global_dice(reh, _last_state(reh))
        baseline = inprocess_run(reh, reh.root / "baseline", **NO_EVAL)
        drill.baseline_dice = global_dice(reh, baseline["method"])


# ---- hostile update, in process ---------------------------------------------------------------------------


# (label, factor applied to the poisoned site's update, run-config overrides)
POISON_CASES = [
    ("update x 1000, mean + max-update-norm=10 (defaults)", 1000.0, {}),
    ("update x -20, mean, norm check off", -20.0, {"max-update-norm": 0.0}),
    ("update x -20, median, norm check off", -20.0, {"aggregation": "median", "max-update-norm": 0.0}),
    (
        "update x -20, trimmed-mean 1/3, norm check off",
        -20.0,
        {"aggregation": "trimmed-mean", "trim-fraction": 0.34, "max-update-norm": 0.0},
    ),
    ("NaN in the update, mean (defaults)", float("nan"), {}),
]


def poisoned_site(root: Path, cfg: RehearsalConfig | None = None, cases=POISON_CASES) -> dict[str, Drill]:
    """The last of three sites sends ``global + factor * (its update - global)`` every round: finite
    and well-formed for a moderate factor (the norm check lets -20 through), absurd for 1000, NaN for
    a NaN factor. Runs in process (the real ClientApp, wrapped) and compares the defaults (weighted
    mean with the norm check) with coordinate median and trimmed mean."""
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Message
    from flwr.clientapp import ClientApp

    from clients.client_app import app as honest_app
    from deploy.sitedata import write_phantom_site
    from federation.inprocess import run_inprocess
    from federation.local import clear_sessions
    from federation.packing import pack_record, unpack_record
    from server.server_app import app as server_app

    cfg = cfg or POISON_CFG
    reh = Rehearsal(root, cfg)
    for i, site in enumerate(reh.sites):
        write_phantom_site(reh.data_roots[site], i, size=cfg.size)
    factor = {"value": 1.0}

    def poison(msg: Message, reply: Message) -> Message:
        if "arrays" not in msg.content.array_records:  # keep-global: only after an evaluation
            raise RuntimeError(
                "the poison drill runs without federated evaluation; this instruction has no arrays"
            )
        sent = {k: v.numpy() for k, v in unpack_record(msg.content["arrays"]).items()}
        bad = ArrayRecord()
        for k, v in unpack_record(reply.content["arrays"]).items():
            a = v.numpy()
            if np.issubdtype(a.dtype, np.floating):
                a = (sent[k] + factor["value"] * (a - sent[k])).astype(a.dtype)
            bad[k] = Array(np.asarray(a, order="C"))
        reply.content["arrays"] = pack_record(bad)
        return reply

    poisoned = ClientApp()

    @poisoned.train()
    def train(msg: Message, context) -> Message:
        reply = honest_app(msg, context)
        hostile = context.node_config["site-index"] == len(reh.sites) - 1
        return poison(msg, reply) if hostile and not reply.has_error() else reply

    @poisoned.evaluate()
    def evaluate(msg: Message, context) -> Message:
        return honest_app(msg, context)

    drills = {}
    with torch_threads(cfg.threads):
        baseline = inprocess_run(reh, reh.root / "baseline", **NO_EVAL)
        base_dice = global_dice(reh, baseline["method"])
        for i, (label, value, overrides) in enumerate(cases):
            t0 = time.monotonic()
            factor["value"] = value
            clear_sessions()
            out = reh.root / f"case{i}"
            settings = run_settings(reh, out, **NO_EVAL, **overrides)
            run_inprocess(server_app, poisoned, settings, node_configs(reh))
            results = json.loads((out / "results.json").read_text())
            state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["method"]
            rejected = [len(r["train-sites"]["rejected"]) for r in results["rounds"]]
            drill = Drill(f"poisoned site (in process): {label}")
            drill.rounds = [r["round"] for r in results["rounds"]]
            drill.dice, drill.baseline_dice = global_dice(reh, state), base_dice
            reasons = [r["train-sites"]["rejected"] for r in results["rounds"]]
            drill.checks = {"rejected updates per round": rejected, "reasons round 1": reasons[0]}
            what = "the poisoned update was rejected" if all(rejected) else "all updates aggregated"
            drill.happened = f"{what} (rejected per round {rejected})"
            drill.seconds = time.monotonic() - t0
            drill.show()
            drills[label] = drill
    return drills


HEADER = (
    "| fault injected | what happened | rounds completed | final Dice | fault-free Dice | time |\n"
    "|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.faults", description="run every fault drill")
    parser.add_argument("--dir", required=True, help="work folder (kept: logs of every drill)")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--local-iterations", type=int, default=0, help="train longer (default: the tests')")
    parser.add_argument("--only", help="comma-separated subset of kill,restart,bad-data,poison")
    args = parser.parse_args(argv)
    root = Path(args.dir)

    def cfg(base: RehearsalConfig) -> RehearsalConfig:
        return replace(base, local_iterations=args.local_iterations or base.local_iterations)

    runs = {
        "kill": lambda: [supernode_killed(root / "killed", cfg(KILL_CFG))],
        "restart": lambda: [superlink_restarted(root / "restarted", cfg(RESTART_CFG))],
        "bad-data": lambda: [bad_site_data(root / "bad-data", cfg(BAD_DATA_CFG))],
        "poison": lambda: list(poisoned_site(root / "poisoned", cfg(POISON_CFG)).values()),
    }
    drills = [d for name in (args.only.split(",") if args.only else runs) for d in runs[name]()]
    table = "\n".join([HEADER, *(d.row() for d in drills)])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
