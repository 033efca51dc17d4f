"""Centralized vs federated vs local-only training on the same sites, label budget and compute.

    python -m simulations.compare --config simulations/acdc3x1_cpu.toml --out runs/compare_acdc

The config is a federation run config (the TOML ``scripts/flwr_run.sh -c`` takes: hyphenated
federation keys plus dotted samatch keys); the method defaults to ``samatch`` unless the config,
``--set method.name=...`` or ``--method`` says otherwise. Three arms, all trained by
:class:`samatch.engine.Trainer` on the same K sites:

* ``federated``: the real ServerApp and ClientApp, driven in this process by
  :func:`federation.inprocess.run_inprocess`; R rounds (``num-server-rounds``) of L local
  iterations (``local-iterations``) on every site (all K sites train in every round);
* ``local``: every site alone on its own data (the TrainData the ClientApp built for it), R x L
  iterations, one model per site;
* ``centralized``: one model on the pooled data, the union of the sites' labeled, unlabeled and
  validation cases (so the same label budget), K x R x L iterations.

Every arm starts from the same initial U-Net (``seed``: the server's initial state and each
Trainer seed the same way before building it).

Matched compute. An iteration is one optimizer step on one labeled batch (and, for semi-supervised
methods, one unlabeled batch) of ``schedule.batch_size``, identical in every arm. Every arm does
K x R x L iterations in all: federated K sites x R rounds x L; local-only the sum over K sites of
R x L; centralized K x R x L in one run. Per site, federated and local-only are equal too (R x L).
Each run's poly learning rate spans its own length (R x L per site, as the ClientApp does; K x R x L
centralized). The counts are recorded from the runs themselves (trainer iterations; train replies
x L) in ``compare.json`` under ``compute``.

Evaluation. The *final* model of each arm (no checkpoint is picked on the reported cases), on the
same cases: the union of the sites' validation cases, per volume at native resolution
(:func:`samatch.evaluate.evaluate_cases`: Dice, HD95, ASD per class; HD95 in mm where the data has
a spacing). Under FedBN a case is predicted with the global model plus its own site's BatchNorm.
Local-only is reported as ``local`` (each case predicted by its own site's model: what a hospital
alone would deploy) and ``local:<site>`` (one site's model on every case). The SAM-Match guide is not
used at inference: every arm is scored on its U-Net.

Statistics. Per case, the mean over classes of Dice (and of HD95), then per patient the mean over
its cases; a paired two-sided Wilcoxon signed-rank test over patients of every arm against
``centralized`` with Bonferroni over the K + 2 comparisons (:func:`samatch.stats.compare_runs`).

Outputs in OUT: ``comparison.md`` (tables), ``compare.json`` (per-case rows, summaries, tests,
per-round Dice, iteration counts, hardware), ``dice_per_round.png``, ``local_sites.png``, and one
run folder per training run (``centralized/``, ``federated/``, ``local/<site>/``; each readable by
``samatch evaluate --run DIR --checkpoint last``).

Sites: the config's ``partition-manifest``; without one, phantom data gives phantom site i for
site i (as in a Flower simulation) and a real dataset is partitioned into ``OUT/partition`` by
:mod:`simulations.partition`. ``--labeled TOTAL`` spreads TOTAL labeled patients evenly over the sites.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomllib
import torch

from federation.config import FederationConfig, Site, parse_run_config, site_from_node_config
from samatch import allocator
from samatch.config import TrainConfig, apply_overrides, parse_set_args
from samatch.data import build_splits, open_reader
from samatch.hardware import hardware
from samatch.io.base import Case, DataError
from samatch.rundir import hold, moved_note, set_aside
from samatch.splits import Splits, save_splits, union_splits
from simulations.compare_report import REFERENCE, write_outputs
from simulations.partition import PARTITIONERS, partition

DEFAULT_METHOD = "samatch"
METRICS = ("dice", "hd95")


# ---- configuration -----------------------------------------------------------------------------


def load_run_config(path: str | Path, sets: list[str], method: str | None) -> dict[str, Any]:
    """Flat run config: ``{"method.name": "samatch"}`` <- TOML file <- ``--set`` <- ``--method``."""
    from flwr.common.config import flatten_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        data = flatten_dict(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{p}: cannot parse TOML: {err}") from None
    run_config = {"method.name": DEFAULT_METHOD, **data, **parse_set_args(sets)}
    if method:
        run_config["method.name"] = method
    return run_config


def check_run_config(run_config: dict[str, Any], fed: FederationConfig, cfg: TrainConfig) -> None:
    """Refuse settings that would break matched compute or the final-model comparison."""
    from samatch.methods import METHODS

    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; choose from {', '.join(sorted(METHODS))}")
    if "schedule.iterations" in run_config:
        raise ValueError(
            "schedule.iterations is derived (num-server-rounds x local-iterations per site); remove it"
        )
    if cfg.schedule.minutes > 0:
        raise ValueError("schedule.minutes (a time budget) would unmatch the arms' iterations; remove it")
    if fed.stop_after_round or fed.resume_from:
        raise ValueError("stop-after-round / resume-from: the comparison runs the whole schedule at once")
    if fed.fraction_train != 1.0 or fed.fraction_evaluate != 1.0:
        raise ValueError("fraction-train / fraction-evaluate must be 1.0: every site trains every round")


@dataclass
class Plan:
    """What every arm runs. ``cfg`` is the per-site config (schedule.iterations = R x L)."""

    run_config: dict[str, Any]  # flat Flower run config of the federated arm (out-dir set)
    cfg: TrainConfig
    fed: FederationConfig
    sites: list[Site]
    out: Path

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def site_iterations(self) -> int:
        return self.fed.num_server_rounds * self.fed.local_iterations

    @property
    def total_iterations(self) -> int:
        return self.num_sites * self.site_iterations

    def node_configs(self) -> list[dict[str, int]]:
        return [{"partition-id": i, "num-partitions": self.num_sites} for i in range(self.num_sites)]


def _even_share(total: int | None, sites: int, default: int) -> int:
    if total is None:
        return default
    if total < sites or total % sites:
        raise ValueError(f"--labeled {total} cannot be spread evenly over {sites} sites")
    return total // sites


def resolve_sites(
    run_config: dict[str, Any], out: Path, sites: int | None, labeled: int | None, partitioner: str
) -> tuple[dict[str, Any], int]:
    """(run config with the sites settled, K): manifest checked or written, ``data.labeled`` per
    site, ``model.num_classes`` set (the server opens no data), all K nodes required every round."""
    if sites is not None and sites < 2:
        raise ValueError(f"a comparison needs at least 2 sites, got --sites {sites}")
    cfg, fed = parse_run_config(run_config)
    run_config = dict(run_config)
    if fed.partition_manifest:
        if not Path(fed.partition_manifest).is_file():
            raise FileNotFoundError(f"{fed.partition_manifest}: partition manifest not found")
        manifest = json.loads(Path(fed.partition_manifest).read_text())
        k = len(manifest["sites"])
        per_site = manifest.get("labeled_per_site")
        if sites is not None and sites != k:
            raise ValueError(f"--sites {sites}, but {fed.partition_manifest} has {k} sites")
        if labeled is not None and labeled != k * per_site:
            raise ValueError(f"--labeled {labeled}, but {fed.partition_manifest} labels {k * per_site}")
    elif cfg.data.format.startswith("phantom-"):
        k = sites or 3
        run_config["data.labeled"] = _even_share(labeled, k, cfg.data.labeled)
    else:
        k = sites or 3
        per_site = _even_share(labeled, k, cfg.data.labeled)
        path = partition(cfg.data, k, partitioner, out / "partition", per_site, cfg.data.seed)
        run_config["partition-manifest"] = str(path)
        print(f"partitioned {cfg.data.root} into {k} sites ({partitioner}) -> {path}", flush=True)
    if k < 2:
        raise ValueError(f"a comparison needs at least 2 sites, got {k}")
    if not cfg.model.num_classes:
        run_config["model.num_classes"] = open_reader(cfg.data).num_classes
    for key in ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes"):
        run_config[key] = k
    run_config["out-dir"] = str(out / "federated")
    return run_config, k


def make_plan(
    run_config: dict[str, Any],
    out: Path,
    sites: int | None = None,
    labeled: int | None = None,
    partitioner: str = "labeled",
) -> Plan:
    cfg, fed = parse_run_config(run_config)
    check_run_config(run_config, fed, cfg)
    run_config, k = resolve_sites(run_config, out, sites, labeled, partitioner)
    cfg, fed = parse_run_config(run_config)
    site_list = [site_from_node_config({"partition-id": i, "num-partitions": k}, cfg, fed) for i in range(k)]
    return Plan(run_config, cfg, fed, site_list, out)


# ---- data: site splits and their union ------------------------------------------------------------


@dataclass
class SiteCases:
    """One site's case ids as its TrainData holds them (``data.max_*`` caps applied)."""

    name: str
    splits: Splits
    unlabeled: list[str]
    val: list[str]


def site_cases(site: Site, cfg: TrainConfig) -> SiteCases:
    data = site.apply(cfg).data
    splits = build_splits(open_reader(data), data)
    # The same caps as samatch.data.build_train_data.
    unlabeled = splits.unlabeled[: data.max_unlabeled] if data.max_unlabeled else list(splits.unlabeled)
    return SiteCases(site.name, splits, unlabeled, splits.val[: data.max_val_cases or None])


def pooled_splits(sites: list[SiteCases]) -> Splits:
    """The centralized arm's splits: the union of the sites' labeled, unlabeled and val cases (as
    capped on the sites); the patients are recomputed when the run loads them."""
    return union_splits([replace(s.splits, unlabeled=s.unlabeled, val=s.val, test=[]) for s in sites])


def pooled_root(site_cfgs: list[TrainConfig]) -> str:
    """Data root of the pooled view: the sites' one shared root (a manifest's dataset), or for
    phantom sites "0", "1", "2" (no manifest) the pooled phantom "0,1,2"."""
    roots = list(dict.fromkeys(c.data.root for c in site_cfgs))
    if len(roots) == 1:
        return roots[0]
    if site_cfgs[0].data.format.startswith("phantom-"):
        return ",".join(roots)
    raise ValueError(f"sites read different folders {roots}; the centralized arm needs one dataset")


def centralized_config(plan: Plan, splits_file: Path) -> TrainConfig:
    """Pooled data, K x R x L iterations, validation once per round-equivalent (K x L)."""
    site_cfgs = [s.apply(plan.cfg) for s in plan.sites]
    over = {
        "data.root": pooled_root(site_cfgs),
        "data.format": site_cfgs[0].data.format,
        "data.splits_file": str(splits_file),
        "data.max_unlabeled": 0,  # already capped per site in the pooled splits
        "data.max_val_cases": 0,
        "schedule.iterations": plan.total_iterations,
        "schedule.eval_every": plan.num_sites * plan.fed.local_iterations,
    }
    return apply_overrides(plan.cfg, over)


# ---- the three arms ---------------------------------------------------------------------------------


def unet_from_state(cfg: TrainConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A U-Net in eval mode from the ``model.`` tensors of a checkpoint state (strict)."""
    from samatch.models.unet import build_unet

    model = build_unet(cfg)
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    return model.eval()


def run_federated(plan: Plan) -> tuple[dict[str, torch.nn.Module], dict[str, int], list[dict]]:
    """The real ServerApp + ClientApp in process.

    Returns (final model of each site: global tensors + its site-local ones under FedBN, training
    iterations each site ran (train replies x L), results.json's rounds).
    """
    from clients.client_app import LOCAL_KEY
    from clients.client_app import app as client_app
    from federation.inprocess import run_inprocess
    from federation.outputs import load_resume
    from federation.state import from_record
    from server.server_app import app as server_app

    grid = run_inprocess(server_app, client_app, plan.run_config, plan.node_configs())
    out = Path(plan.fed.out_dir)
    global_state = load_resume(out)["method"]
    models, steps = {}, {}
    for node_id, context in grid.contexts.items():
        site = plan.sites[int(context.node_config["partition-id"])]
        local = context.state.array_records.get(LOCAL_KEY)
        state = {**global_state, **(from_record(local) if local is not None else {})}
        models[site.name] = unet_from_state(plan.cfg, state)
        trained = [m for n, m in grid.sent if n == node_id and m.metadata.message_type == "train"]
        steps[site.name] = sum(not m.has_error() for m in trained) * plan.fed.local_iterations
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    return models, steps, rounds


def fresh_run_dir(path: Path) -> None:
    """An earlier run's folder at ``path`` (under ``--overwrite``) is moved aside, so the new run's
    metrics.csv and TensorBoard logs hold none of its rows."""
    if moved := set_aside(path):
        print(f"  {moved_note(path, moved)}", flush=True)


def prepare_run_dir(path: Path, cfg: TrainConfig, splits: Splits) -> Path:
    """config.json + splits.json, so ``samatch evaluate --run`` reads the folder."""
    fresh_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path / "config.json")
    save_splits(splits, path / "splits.json")
    return path


def train(cfg: TrainConfig, data, out: Path, progress: bool):
    """One Trainer run to ``cfg.schedule.iterations``; returns the trainer (final model in it)."""
    from samatch.engine import Trainer

    with hold(out):  # no other run moves or writes into the arm's folder meanwhile
        trainer = Trainer(cfg, data, out_dir=out)
        trainer.run(progress=progress)
    return trainer


def run_local(plan: Plan, cases: dict[str, SiteCases], progress: bool) -> dict[str, Any]:
    """Each site alone, R x L iterations, on the TrainData the ClientApp built for it."""
    from federation.local import get_session

    trainers = {}
    for site in plan.sites:
        session = get_session(site, plan.cfg)
        cfg = apply_overrides(session.cfg, {"schedule.eval_every": plan.fed.local_iterations})
        run_dir = prepare_run_dir(plan.out / "local" / site.name, cfg, cases[site.name].splits)
        print(f"  local-only {site.name}: {cfg.schedule.iterations} iterations", flush=True)
        trainers[site.name] = train(cfg, session.trainer.data, run_dir, progress)
    return trainers


def run_centralized(plan: Plan, pooled: Splits, progress: bool):
    """One model on the pooled data for K x R x L iterations."""
    from samatch.data import build_train_data

    run_dir = plan.out / REFERENCE
    fresh_run_dir(run_dir)
    splits_file = save_splits(pooled, run_dir / "splits.json")
    cfg = centralized_config(plan, splits_file)
    data = build_train_data(cfg)  # re-reads and checks the pooled splits
    cfg.save(run_dir / "config.json")
    return train(cfg, data, run_dir, progress)


# ---- evaluation -------------------------------------------------------------------------------------


def evaluate_per_site(
    models: dict[str, torch.nn.Module], cases_by_site: dict[str, list[Case]], cfg: TrainConfig
) -> list[dict]:
    """Rows (case, patient, class, dice, hd95, asd, units, empty): each site's cases with ``models[site]``."""
    from samatch.engine import resolve_device
    from samatch.evaluate import evaluate_cases

    device = resolve_device(cfg.device)
    rows = []
    for site, cases in cases_by_site.items():
        model = models[site].to(device)
        rows += evaluate_cases(model, cases, cfg.model.num_classes, cfg.data.size, device, distances=True)
    return sorted(rows, key=lambda r: (r["case"], r["class"]))


def evaluate_arms(
    central, federated: dict, local: dict, cases_by_site: dict[str, list[Case]], cfg: TrainConfig
) -> dict[str, list[dict]]:
    """Rows of every arm on the same cases (see the module docstring for the arms)."""
    sites = list(cases_by_site)
    arms = {
        REFERENCE: evaluate_per_site(dict.fromkeys(sites, central), cases_by_site, cfg),
        "federated": evaluate_per_site(federated, cases_by_site, cfg),
    }
    for name, model in local.items():
        arms[f"local:{name}"] = evaluate_per_site(dict.fromkeys(sites, model), cases_by_site, cfg)
    own = {c.meta.case_id: site for site, cs in cases_by_site.items() for c in cs}
    arms["local"] = [r for name in local for r in arms[f"local:{name}"] if own[r["case"]] == name]
    arms["local"].sort(key=lambda r: (r["case"], r["class"]))
    return arms


def paired_tests(rows_by_arm: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per metric: Wilcoxon of each arm vs centralized on per-patient means, Bonferroni over arms."""
    from dataclasses import asdict

    from samatch.stats import case_means, compare_runs, patients_of

    patients = patients_of(r for rows in rows_by_arm.values() for r in rows)
    out = {}
    for metric in METRICS:
        per_case = {arm: case_means(rows, metric) for arm, rows in rows_by_arm.items()}
        out[metric] = [asdict(c) for c in compare_runs(per_case, reference=REFERENCE, groups=patients)]
    return out


# ---- the whole comparison ---------------------------------------------------------------------------


def dataset_name(cfg: TrainConfig) -> str:
    if cfg.data.format.startswith("phantom-"):
        return f"{cfg.data.format} sites {cfg.data.root}"
    return f"{Path(cfg.data.root).name} ({cfg.data.format or 'auto'})"


def round_histories(plan: Plan, fed_rounds: list[dict], central_history: list[dict]) -> dict:
    """Validation Dice per round: federated (results.json) and centralized at the same compute."""
    per_round = plan.num_sites * plan.fed.local_iterations
    return {
        "federated": [{"round": r["round"], **r.get("evaluate", {})} for r in fed_rounds],
        REFERENCE: [{"round": h["iteration"] / per_round, **h} for h in central_history],
    }


@dataclass
class Trained:
    """The arms after training: final models, iteration counts, histories, wall times."""

    federated: dict[str, torch.nn.Module]  # site -> global model (+ its BatchNorm under FedBN)
    federated_steps: dict[str, int]  # site -> iterations trained (train replies x L)
    federated_rounds: list[dict]  # results.json rounds
    local: dict[str, Any]  # site -> its Trainer
    central: Any  # the centralized Trainer
    seconds: dict[str, float]


def train_arms(plan: Plan, cases: list[SiteCases], progress: bool) -> Trained:
    from federation.local import clear_sessions

    k, r, loc = plan.num_sites, plan.fed.num_server_rounds, plan.fed.local_iterations
    pooled = pooled_splits(cases)
    seconds = {}
    clear_sessions()
    try:
        print(f"[1/4] federated: {k} sites x {r} rounds x {loc} iterations", flush=True)
        t0 = time.perf_counter()
        fed_models, fed_steps, fed_rounds = run_federated(plan)
        seconds["federated"] = time.perf_counter() - t0
        print(f"[2/4] local-only: {k} sites x {r * loc} iterations", flush=True)
        t0 = time.perf_counter()
        local = run_local(plan, {c.name: c for c in cases}, progress)
        seconds["local"] = time.perf_counter() - t0
    finally:
        clear_sessions()  # the sites' data is no longer needed
    print(f"[3/4] centralized: pooled data, {plan.total_iterations} iterations", flush=True)
    t0 = time.perf_counter()
    central = run_centralized(plan, pooled, progress)
    seconds[REFERENCE] = time.perf_counter() - t0
    # The pooled splits as the centralized run checked them, for `samatch evaluate --run federated`.
    shutil.copyfile(plan.out / REFERENCE / "splits.json", Path(plan.fed.out_dir) / "splits.json")
    return Trained(fed_models, fed_steps, fed_rounds, local, central, seconds)


def compute_record(plan: Plan, t: Trained) -> dict[str, Any]:
    """Iteration counts as the runs report them (not as planned)."""
    return {
        "definition": "iteration = one optimizer step on batch_size labeled (+ batch_size unlabeled) "
        "images; every arm runs sites x rounds x local_iterations in all",
        "sites": plan.num_sites,
        "rounds": plan.fed.num_server_rounds,
        "local_iterations": plan.fed.local_iterations,
        "batch_size": plan.cfg.schedule.batch_size,
        "iterations": {
            REFERENCE: t.central.iteration,
            "federated": sum(t.federated_steps.values()),
            "local": sum(tr.iteration for tr in t.local.values()),
        },
        "per_site": {
            "federated": t.federated_steps,
            "local": {name: tr.iteration for name, tr in t.local.items()},
        },
    }


def site_record(c: SiteCases, trainer) -> dict[str, Any]:
    """A site's data as its local run trained on it (unlabeled slices: 0 if the method uses none)."""
    unlabeled = trainer.data.unlabeled
    used = unlabeled is not None and trainer.method.uses_unlabeled
    return {
        "name": c.name,
        "labeled_patients": c.splits.patients["labeled"],
        "labeled_slices": len(trainer.data.labeled),
        "unlabeled_slices": len(unlabeled) if used else 0,
        "val_cases": c.val,
    }


def compare(plan: Plan, progress: bool = True) -> dict[str, Any]:
    """Train the three arms, evaluate them on the same cases; the results dict (compare.json)."""
    from samatch.metrics import summarize

    plan.out.mkdir(parents=True, exist_ok=True)
    cases = [site_cases(s, plan.cfg) for s in plan.sites]
    t = train_arms(plan, cases, progress)
    print(f"[4/4] evaluating {len(t.central.data.val)} validation cases per arm", flush=True)
    t0 = time.perf_counter()
    by_id = {c.meta.case_id: c for c in t.central.data.val}
    cases_by_site = {c.name: [by_id[i] for i in c.val] for c in cases}
    local_models = {name: tr.model for name, tr in t.local.items()}
    rows = evaluate_arms(t.central.model, t.federated, local_models, cases_by_site, plan.cfg)
    t.seconds["evaluation"] = time.perf_counter() - t0
    return {
        "run_config": plan.run_config,
        "method": plan.cfg.method.name,
        "dataset": dataset_name(t.central.cfg),
        "class_names": list(t.central.data.class_names),
        "hardware": hardware(),
        "sites": [site_record(c, t.local[c.name]) for c in cases],
        "compute": compute_record(plan, t),
        "seconds": {key: round(v, 1) for key, v in t.seconds.items()},
        "case_site": {i: c.name for c in cases for i in c.val},
        "arms": {arm: {"rows": r, "summary": summarize(r)} for arm, r in rows.items()},
        "tests": {"reference": REFERENCE, **paired_tests(rows)},
        "rounds": round_histories(plan, t.federated_rounds, t.central.history),
    }


# ---- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Centralized vs federated vs local-only training with matched compute: "
        "table (Dice / HD95 per class, Wilcoxon vs centralized), JSON and PNG plots.",
        epilog="Matched compute: every arm runs K sites x R rounds x L local iterations in all "
        "(see the module docstring). Example: python -m simulations.compare "
        "--config simulations/phantom3.toml --method unimatch --out runs/compare_phantom",
    )
    p.add_argument("--config", required=True, help="federation run config TOML (hyphenated + dotted keys)")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument(
        "--method", help=f"training method of every arm (default: the config's, else {DEFAULT_METHOD})"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, repeatable")
    p.add_argument("--sites", type=int, help="number of sites (default: the manifest's, else 3)")
    p.add_argument("--labeled", type=int, help="total labeled budget (patients), spread evenly over sites")
    p.add_argument(
        "--partitioner",
        default="labeled",
        choices=sorted(PARTITIONERS),
        help="how a real dataset without a manifest is split into sites (default: labeled)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty --out folder (each arm's earlier run folder is moved aside)",
    )
    allocator.add_allocator_argument(p)
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}: folder is not empty (use --overwrite or another --out)")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_config = load_run_config(args.config, args.set, args.method)
    plan = make_plan(run_config, out, args.sites, args.labeled, args.partitioner)
    t0 = time.perf_counter()
    result = compare(plan, progress=not args.quiet)
    result["command"] = shlex.join(["python", "-m", "simulations.compare", *argv])
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    paths = write_outputs(result, out)
    print(Path(paths["table"]).read_text())
    print("->", ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.relaunch(args.allocator, argv, parser)  # from the command line: start again on it
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, argv)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
