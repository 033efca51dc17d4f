"""The local rehearsal: a real deployment on 127.0.0.1, driven through ``python -m deploy``.

One SuperLink (TLS with a fresh private CA, SuperNode authentication, a state database) and N
SuperNodes, each with its own key, its own FLWR_HOME and its own data folder (phantom patients
written as an nnU-Net NIfTI dataset; or, with ``sites_from``, a real dataset read in place through
each site's splits file of a partition manifest), run a short federation to the end; then every
process started is stopped (:class:`deploy.procs.ProcessSet`). Every step is a ``python -m deploy
...`` command, the same ones docs/deployment.md gives a hospital IT team; they are printed and kept
in ``<dir>/commands.txt``. The fault tests drive the same class and inject their fault in between.
"""

from __future__ import annotations

import json
import shlex
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploy.commands import REPO, SiteSpec, flower_env, run_config_arg
from deploy.node import RuntimeSettings
from deploy.pki import PkiLayout
from deploy.procs import Managed, ProcessSet

CONNECTION = "rehearsal"


def dataset_classes(spec: SiteSpec) -> int:
    """The number of classes (background included) of a site's dataset, from its reader."""
    from samatch.config import DataConfig
    from samatch.data import open_reader

    cfg = DataConfig(root=spec.data_root, format=spec.data_format, label_map=spec.label_map)
    return open_reader(cfg).num_classes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RehearsalConfig:
    """A federation small enough for a 2-core CPU: 32 px, U-Net base 8, a few rounds."""

    sites: int = 3
    rounds: int = 2
    local_iterations: int = 15
    size: int = 32
    base_channels: int = 8
    round_timeout: float = 120.0  # per phase; the fault tests shorten it
    min_train_replies: int = 1
    straggler_timeout: float = 0.0  # >0: a round stops waiting this long after min_train_replies
    evaluate_every: int = 0  # federated evaluation after the last round only (saves a phase a round)
    timeout: float = 600.0  # bound on one `deploy run`
    threads: int = 1  # torch threads per ClientApp
    restart_delay: float = 3.0  # SuperNodes run under `deploy supernode --restart-delay`
    # `deploy supernode --poll-interval --reply-check --warm`: idle poll, reply checks, warm ClientApps
    runtime: RuntimeSettings = RuntimeSettings()
    aggregation: str = "mean"
    # The deployment's plumbing, not the method, is rehearsed: UniMatch, whatever the app's default
    # (SAM-Match costs seconds per step and per encoded slice in every fresh ClientApp process here).
    method: str = "unimatch"
    # A partition manifest (simulations/partition.py): its first `sites` sites' data, read in place
    # (the dataset's folder and each site's splits file), instead of phantom folders; `sites_root`:
    # the same dataset in another folder than the manifest's.
    sites_from: str = ""
    sites_root: str = ""

    def site_data(self, root: Path, sites: list[str]) -> dict[str, SiteSpec]:
        """Each site's data: phantom NIfTI folders under ``root``, or the manifest's sites."""
        if not self.sites_from:
            return {
                s: SiteSpec(s, str(root / "sites" / s / "data"), "nifti", index=i)
                for i, s in enumerate(sites)
            }
        path = Path(self.sites_from).resolve()
        try:
            manifest = json.loads(path.read_text())
            entries, data_root, fmt = (
                manifest["sites"],
                self.sites_root or manifest["root"],
                manifest["format"],
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a partition manifest ({err})") from None
        if len(entries) < len(sites):
            raise ValueError(f"{path}: {len(entries)} sites, the rehearsal needs {len(sites)}")
        return {
            s: SiteSpec(
                s, data_root, fmt, manifest.get("label_map", ""), str(path.parent / e["splits_file"]), i
            )
            for i, (s, e) in enumerate(zip(sites, entries, strict=False))
        }

    def run_config(self) -> dict[str, object]:
        return {
            "method.name": self.method,
            "num-server-rounds": self.rounds,
            "local-iterations": self.local_iterations,
            "min-available-nodes": self.sites,
            "min-train-nodes": self.sites,
            "min-evaluate-nodes": self.sites,
            "min-train-replies": self.min_train_replies,
            "straggler-timeout": self.straggler_timeout,
            "round-timeout": self.round_timeout,
            "evaluate-every": self.evaluate_every,
            "aggregation": self.aggregation,
            "model.num_classes": 4,  # the cardiac phantom's; a manifest's dataset: Rehearsal.run_config's
            "data.size": self.size,
            "model.base_channels": self.base_channels,
            "schedule.batch_size": 4,
            "data.max_unlabeled": 12,
        }


@dataclass
class RunOutcome:
    returncode: int
    log: str
    results: dict

    @property
    def rounds(self) -> list[int]:
        return [r["round"] for r in self.results.get("rounds", [])]

    @property
    def final_dice(self) -> float | None:
        evaluated = [r["evaluate"]["dice_mean"] for r in self.results.get("rounds", []) if "evaluate" in r]
        return evaluated[-1] if evaluated else None


class Rehearsal:
    """Paths, ports and processes of one rehearsal under ``root``."""

    def __init__(self, root: Path, cfg: RehearsalConfig | None = None):
        self.root = Path(root).resolve()
        self.cfg = cfg or RehearsalConfig()
        self.pki = PkiLayout(self.root / "pki")
        self.coordinator = self.root / "coordinator"
        self.out_dir = self.root / "run"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.sites = [f"hospital{chr(ord('A') + i)}" for i in range(self.cfg.sites)]
        self.runtime_ports = {site: free_port() for site in self.sites}
        self.site_specs = self.cfg.site_data(self.root, self.sites)
        self.site_homes = {site: self.root / "sites" / site / "flwr-home" for site in self.sites}
        self.node_ids: dict[str, int] = {}
        self.procs = ProcessSet(self.root / "logs", env=flower_env())
        self.commands: list[str] = []

    @property
    def data_roots(self) -> dict[str, Path]:
        """{site: its data folder}, from ``site_specs``."""
        return {site: Path(spec.data_root) for site, spec in self.site_specs.items()}

    # ---- commands ----------------------------------------------------------------------------------
    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "deploy", *args]

    def _record(self, argv: list[str]) -> None:
        line = shlex.join(["python", *argv[1:]])
        self.commands.append(line)
        with (self.root / "commands.txt").open("a") as f:
            f.write(line + "\n")
        print(f"$ {line}", flush=True)

    def deploy(self, *args: str, timeout: float = 120.0) -> str:
        """Run one short ``python -m deploy`` step; its output, or RuntimeError naming the step."""
        import subprocess

        argv = self._argv(*args)
        self._record(argv)
        res = subprocess.run(
            argv, cwd=REPO, env=self.procs.env, capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"deploy {args[0]} failed ({res.returncode}): {(res.stdout + res.stderr)[-800:]}"
            )
        return res.stdout

    def start(self, name: str, *args: str) -> Managed:
        """Start a long-running ``python -m deploy`` step (SuperLink, SuperNode, run)."""
        argv = self._argv(*args)
        self._record(argv)
        return self.procs.start(name, argv, cwd=REPO)

    # ---- steps -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Site folders, the CA and SuperLink certificate, one key pair per site, the connection."""
        from deploy.sitedata import write_phantom_site

        self.root.mkdir(parents=True, exist_ok=True)
        if not self.cfg.sites_from:
            for i, site in enumerate(self.sites):
                write_phantom_site(self.data_roots[site], i, size=self.cfg.size)
        self.deploy("certs", "--pki", str(self.pki.root), "--host", "127.0.0.1", "--host", "localhost")
        for site in self.sites:  # at each site; only node.pub travels to the coordinator
            self.deploy("site-key", "--pki", str(self.pki.root), "--site", site)
        self.deploy(
            "connect",
            "--flwr-home",
            str(self.coordinator / "flwr-home"),
            "--name",
            CONNECTION,
            "--address",
            self.address,
            "--ca",
            str(self.pki.ca_cert),
        )

    def start_superlink(self, wait: float = 60.0) -> Managed:
        proc = self.start(
            "superlink",
            "superlink",
            "--pki",
            str(self.pki.root),
            "--state-dir",
            str(self.coordinator / "state"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--flwr-home",
            str(self.coordinator / "flwr-home"),
        )
        self.wait_healthy(proc, wait)
        return proc

    def wait_healthy(self, proc: Managed, wait: float) -> None:
        """Until the SuperLink answers /health over TLS (verified against the CA)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not proc.running():
                raise RuntimeError(f"SuperLink exited: {proc.log_text()[-1500:]}")
            try:
                urllib.request.urlopen(f"https://{self.address}/health", timeout=1, context=context)
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"SuperLink not healthy on {self.address} after {wait:.0f} s")

    def register(self, site: str) -> int:
        out = self.deploy(
            "register",
            "--public-key",
            str(self.pki.node_pub(site)),
            "--site",
            site,
            "--connection",
            CONNECTION,
            "--flwr-home",
            str(self.coordinator / "flwr-home"),
        )
        self.node_ids[site] = int(json.loads(out.strip().splitlines()[-1])["node-id"])
        return self.node_ids[site]

    def supernode_args(self, site: str, data_root: Path | None = None) -> list[str]:
        spec = self.site_specs[site]
        data = [
            f"--{k}={v}" for k, v in (("label-map", spec.label_map), ("splits-file", spec.splits_file)) if v
        ]
        return [
            "supernode",
            "--superlink",
            self.address,
            "--ca",
            str(self.pki.ca_cert),
            "--key",
            str(self.pki.node_key(site)),
            "--site-name",
            site,
            "--data-root",
            str(data_root or self.data_roots[site]),
            "--data-format",
            spec.data_format,
            *data,
            "--site-index",
            str(spec.index),
            "--runtime-port",
            str(self.runtime_ports[site]),
            "--threads",
            str(self.cfg.threads),
            "--restart-delay",
            str(self.cfg.restart_delay),
            "--flwr-home",
            str(self.site_homes[site]),
            *self.runtime_args(),
        ]

    def runtime_args(self) -> list[str]:
        """``deploy supernode``'s runtime options where they differ from its defaults (so the
        rehearsal's commands stay those of docs/deployment.md)."""
        return self.cfg.runtime.argv(changed_only=True)

    def start_site(self, site: str, data_root: Path | None = None) -> Managed:
        return self.start(f"supernode-{site}", *self.supernode_args(site, data_root))

    def wait_connected(self, sites: list[str], wait: float = 60.0) -> None:
        """Until each site's SuperNode has logged its node ID (activation accepted by the SuperLink)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if all(self.connections(s) > 0 for s in sites):
                return
            time.sleep(0.3)
        raise TimeoutError(f"SuperNodes not connected after {wait:.0f} s: {sites}")

    def connections(self, site: str) -> int:
        name = f"supernode-{site}"
        return self.procs.procs[name].log_text().count("SuperNode ID:") if name in self.procs.procs else 0

    def run_config(self) -> dict[str, object]:
        """The run's settings: the config's, and its sites' data format (and, for a manifest's
        dataset, its classes: the server builds the model before any site reads)."""
        spec = self.site_specs[self.sites[0]]
        data: dict[str, object] = {"data.format": spec.data_format}
        if self.cfg.sites_from:
            data["model.num_classes"] = dataset_classes(spec)
        return {**self.cfg.run_config(), **data}

    def start_run(self, **overrides: object) -> Managed:
        settings = {**self.run_config(), **overrides}
        return self.start(
            "run",
            "run",
            "--connection",
            CONNECTION,
            "--out-dir",
            str(self.out_dir),
            "-c",
            run_config_arg(settings),
            "--timeout",
            str(self.cfg.timeout),
            "--flwr-home",
            str(self.coordinator / "flwr-home"),
        )

    def finish_run(self, proc: Managed, wait: float | None = None) -> RunOutcome:
        deadline = time.monotonic() + (wait or self.cfg.timeout + 60)
        while proc.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        if proc.running():
            self.procs.stop(proc.name)
        rc = proc.popen.returncode if proc.popen.returncode is not None else -1
        return RunOutcome(rc, proc.log_text(), self.results())

    def results(self) -> dict:
        """The run's results.json ({} while there is none, or while it is being rewritten)."""
        try:
            return json.loads((self.out_dir / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def up(self) -> None:
        """Everything up to a run: files, SuperLink, registrations, SuperNodes connected."""
        self.prepare()
        self.start_superlink()
        for site in self.sites:
            self.register(site)
        for site in self.sites:
            self.start_site(site)
        self.wait_connected(self.sites)

    def stop(self) -> list[int]:
        """Stop every process started; returns stragglers found by the environment marker."""
        return self.procs.stop_all()

    # ---- the command -------------------------------------------------------------------------------
    @classmethod
    def main(cls, root: Path | None, cfg: RehearsalConfig) -> int:
        tmp = None if root else tempfile.TemporaryDirectory(prefix="fedsamatch-rehearsal-")
        rehearsal = cls(Path(root or tmp.name), cfg)
        t0 = time.monotonic()
        outcome, stragglers = None, []
        try:
            rehearsal.up()
            outcome = rehearsal.finish_run(rehearsal.start_run())
        finally:
            stragglers = rehearsal.stop()
            left = rehearsal.procs.leftovers()
        accepted = (
            [len(r.get("train-sites", {}).get("accepted", [])) for r in outcome.results.get("rounds", [])]
            if outcome
            else []
        )
        ok = (
            outcome is not None
            and outcome.returncode == 0
            and outcome.rounds == list(range(1, cfg.rounds + 1))
            and accepted == [cfg.sites] * cfg.rounds
            and outcome.final_dice is not None
        )
        print(f"rehearsal: {'PASSED' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s", flush=True)
        if outcome is not None:
            print(
                f"rehearsal: rounds completed {outcome.rounds}; updates aggregated per round {accepted} "
                f"of {cfg.sites} sites; final val Dice {outcome.final_dice}",
                flush=True,
            )
            print(f"rehearsal: node ids {rehearsal.node_ids}", flush=True)
            if not ok:
                print(outcome.log[-3000:], flush=True)
        print(
            f"rehearsal: processes stopped; stragglers killed {stragglers}; still running {left}", flush=True
        )
        if tmp is not None:
            tmp.cleanup()
        else:
            print(f"rehearsal: files kept in {rehearsal.root} (logs/, run/, commands.txt)", flush=True)
        return 0 if ok and not left else 1
