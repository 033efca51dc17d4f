"""The command lines of a deployment, built in one place (the CLI, the rehearsal and the docs use
these; nothing else spells a Flower flag).

Secure by default: the SuperLink serves TLS with the private CA's certificate and accepts only
registered SuperNode keys (``--enable-supernode-auth``); SuperNodes verify the SuperLink against the
CA and sign with their key. ``insecure=True`` (the CLI's ``--insecure-plaintext``) drops both and
is meant for a throw-away test on one machine only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, installed with flwr
    import tomli as tomllib

import tomli_w

from deploy.node import RuntimeSettings
from deploy.pki import PkiLayout, check_site_name

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flower-superlink, flower-supernode, flwr
DATABASE = "state.db"  # SuperLink state (registered nodes, runs) under the coordinator's state dir

# Every Flower process of a deployment: no telemetry, no update check, no run-time `pip install`,
# and a SuperExec that looks for new tasks (a ServerApp or ClientApp process to start: one per
# message on a site) every 0.1 s instead of Flower 1.42's 1 s.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}

# Run-config settings every deployment run gets: restarts resume (<out-dir>/last.pt), a message is one
# packed array instead of one HTTPS object per tensor, and a round's evaluation and the next round's
# training are one message per site (each message costs a site a fresh ClientApp process).
DEPLOY_RUN_CONFIG = {"resume-from": "auto", "pack-arrays": True, "evaluate-then-train": True}


def flower_env(flwr_home: Path | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment for Flower processes: PATH with the venv's bin first (the SuperLink and SuperNode
    start ``flower-superexec`` by name), the switches above, and optionally FLWR_HOME / threads."""
    env = {**FLOWER_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


@dataclass(frozen=True)
class SuperLinkSpec:
    """The coordinator's SuperLink: one HTTPS port for the Fleet (SuperNodes), Control (`flwr`) and
    Runtime (ServerApp) APIs."""

    pki: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9093
    insecure: bool = False

    @property
    def database(self) -> Path:
        return Path(self.state_dir) / DATABASE


def superlink_argv(spec: SuperLinkSpec) -> list[str]:
    argv = [
        str(BIN / "flower-superlink"),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--database",
        str(spec.database),
        "--disable-runtime-dependency-installation",
    ]
    if spec.insecure:
        return argv + ["--insecure"]
    pki = PkiLayout(Path(spec.pki))
    for path in (pki.ca_cert, pki.server_cert, pki.server_key):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; create the certificates first (deploy certs)")
    return argv + [
        "--ssl-ca-certfile",
        str(pki.ca_cert),
        "--ssl-certfile",
        str(pki.server_cert),
        "--ssl-keyfile",
        str(pki.server_key),
        "--enable-supernode-auth",
    ]


@dataclass(frozen=True)
class SiteSpec:
    """One hospital's node config: where its data is and how to read it (STYLE 2: site facts)."""

    name: str
    data_root: str
    data_format: str = ""
    label_map: str = ""
    splits_file: str = ""
    index: int = 0  # seeds the site's per-round randomness; give each site its own
    state_dir: str = ""  # site-local: FedBN tensors per round (federation.site_state)
    task: str = ""  # cross-task federation: a task of the run's partition manifest

    def node_items(self) -> dict[str, str | int]:
        """The node config as Flower hands it to the ClientApp (the settings given, and the index)."""
        items: dict[str, str | int] = {"data-root": self.data_root, "site-name": self.name}
        for key, value in (
            ("data-format", self.data_format),
            ("label-map", self.label_map),
            ("splits-file", self.splits_file),
            ("state-dir", self.state_dir),
            ("task", self.task),
        ):
            if value:
                items[key] = value
        items["site-index"] = int(self.index)
        return items

    def node_config(self) -> str:
        """The ``--node-config`` string (``federation.config.site_from_node_config`` reads it)."""
        check_site_name(self.name)
        parts = []
        for key, value in self.node_items().items():
            if isinstance(value, str):
                if '"' in value or "\\" in value or "\n" in value:
                    raise ValueError(
                        f"node config {key}={value!r}: quotes, backslashes and newlines not allowed"
                    )
                parts.append(f'{key}="{value}"')
            else:
                parts.append(f"{key}={value}")
        return " ".join(parts)


def supernode_argv(
    site: SiteSpec,
    superlink: str,
    ca_cert: Path | None,
    node_key: Path | None,
    runtime_port: int = 9094,
    insecure: bool = False,
) -> list[str]:
    """``flower-supernode`` for ``site``; its Runtime API (ClientApp <-> SuperNode) stays on
    127.0.0.1:``runtime_port``, so each SuperNode on one machine needs its own port."""
    argv = [
        str(BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        site.node_config(),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if insecure:
        return argv + ["--insecure"]
    for what, path in (("CA certificate", ca_cert), ("node key", node_key)):
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {what} missing (deploy certs / deploy site-key)")
    return argv + ["--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(node_key)]


def node_argv(flower_argv: list[str], runtime: RuntimeSettings) -> list[str]:
    """``flower_argv`` (a :func:`supernode_argv`) run through :mod:`deploy.node` with ``runtime``'s
    idle poll, reply checks and warm ClientApps."""
    return [sys.executable, "-m", "deploy.node", *runtime.argv(), "--", *flower_argv[1:]]


def write_connection(
    flwr_home: Path, name: str, address: str, ca_cert: Path | None, insecure: bool = False
) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``FLWR_HOME/config.toml`` and make it
    the default; `flwr run . <name>` and `flwr supernode ...` use it."""
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    conn: dict[str, str | bool] = {"address": address}
    if insecure:
        conn["insecure"] = True
    else:
        if ca_cert is None or not Path(ca_cert).is_file():
            raise FileNotFoundError(f"{ca_cert}: CA certificate missing")
        conn["root-certificates"] = str(Path(ca_cert).resolve())
    links[name] = conn
    links["default"] = name
    path.write_text(tomli_w.dumps(data))
    return path


def register_argv(public_key: Path, connection: str, site: str) -> list[str]:
    return [
        str(BIN / "flwr"),
        "supernode",
        "register",
        str(public_key),
        connection,
        "--name",
        check_site_name(site),
        "--format",
        "json",
    ]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text or "\\" in text:
        raise ValueError(f"run config value {text!r}: quotes and backslashes not allowed")
    return f'"{text}"'


def run_config_arg(settings: Mapping[str, object]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in settings.items())


def run_argv(connection: str, out_dir: Path, overrides: list[str] | None = None) -> list[str]:
    """``flwr run`` of this app on ``connection``, with the deployment's settings and an absolute
    out-dir (the ServerApp runs in the SuperLink's working directory)."""
    settings = {**DEPLOY_RUN_CONFIG, "out-dir": str(Path(out_dir).resolve())}
    argv = [str(BIN / "flwr"), "run", str(REPO), connection, "--stream", "-c", run_config_arg(settings)]
    for extra in overrides or []:
        argv += ["-c", extra]
    return argv
