"""``python -m deploy``: certificates, keys, SuperLink, SuperNodes, registration, runs, rehearsal.

Coordinator:  certs, superlink, connect, register, run      Site:  site-key, supernode
Both:         rehearse (the whole thing on 127.0.0.1, then everything stopped)

Each subcommand prints the Flower command it runs. Errors are one line naming the file or setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from deploy import commands as cmd
from deploy.node import RuntimeSettings, add_runtime_arguments
from deploy.pki import PkiLayout, create_ca, create_site_key, issue_server_cert, server_cert_hosts
from samatch import allocator

INSECURE_HELP = "plain HTTP, no TLS, no node authentication: a throw-away test on one machine only"


def _env(args: argparse.Namespace, threads: int | None = None) -> dict[str, str]:
    home = getattr(args, "flwr_home", None)
    return {**os.environ, **cmd.flower_env(Path(home) if home else None, threads)}


def _show(argv: list[str]) -> None:
    print("$ " + " ".join(argv), flush=True)


# ---- coordinator -----------------------------------------------------------------------------------


def do_certs(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.pki))
    if args.new_ca or not layout.ca_cert.is_file():
        create_ca(layout, overwrite=args.new_ca)
        print(f"CA: {layout.ca_cert} (private key {layout.ca_key}: keep offline)")
    if args.renew_server or args.new_ca or not layout.server_cert.is_file():
        issue_server_cert(layout, args.host, days=args.days, overwrite=True)
    print(
        f"SuperLink certificate: {layout.server_cert} for {', '.join(server_cert_hosts(layout.server_cert))}"
    )
    for site in args.site:
        priv, pub = create_site_key(layout, site, overwrite=args.force)
        print(f"site {site}: private key {priv} (stays at the site), public key {pub}")
    return 0


def do_site_key(args: argparse.Namespace) -> int:
    priv, pub = create_site_key(PkiLayout(Path(args.pki)), args.site, overwrite=args.force)
    print(f"site {args.site}: private key {priv} (never leaves this machine)")
    print(f"send to the coordinator: {pub}")
    return 0


def do_superlink(args: argparse.Namespace) -> int:
    spec = cmd.SuperLinkSpec(
        Path(args.pki), Path(args.state_dir), args.host, args.port, args.insecure_plaintext
    )
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    argv = cmd.superlink_argv(spec)
    _show(argv)
    os.execve(argv[0], argv, _env(args))  # the SuperLink replaces this process (same PID)
    return 1


def do_connect(args: argparse.Namespace) -> int:
    path = cmd.write_connection(
        Path(args.flwr_home),
        args.name,
        args.address,
        Path(args.ca) if args.ca else None,
        args.insecure_plaintext,
    )
    print(f"connection {args.name!r} -> {args.address} written to {path} (default)")
    return 0


def do_register(args: argparse.Namespace) -> int:
    argv = cmd.register_argv(Path(args.public_key), args.connection, args.site)
    _show(argv)
    res = subprocess.run(argv, env=_env(args), capture_output=True, text=True, timeout=args.timeout)
    match = re.search(r'"node-id":\s*(\d+)', res.stdout)
    if res.returncode != 0 or not match:
        print(f"register {args.site}: failed: {(res.stdout + res.stderr).strip()[-500:]}", file=sys.stderr)
        return 1
    print(json.dumps({"site": args.site, "node-id": int(match.group(1))}))
    return 0


def _run_status(run_id: str, args: argparse.Namespace) -> str:
    argv = [str(cmd.BIN / "flwr"), "ls", args.connection, "--run-id", run_id, "--format", "json"]
    res = subprocess.run(argv, env=_env(args), capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(res.stdout).get("runs", [])
    except json.JSONDecodeError:
        return "unknown"
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def do_run(args: argparse.Namespace) -> int:
    argv = cmd.run_argv(args.connection, Path(args.out_dir), args.run_config)
    _show(argv)
    proc = subprocess.Popen(
        argv, cwd=cmd.REPO, env=_env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []

    def pump() -> None:  # `flwr run --stream` prints the ServerApp's log until the run ends
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if not found and (m := re.search(r"started run (\d+)", line)):
                found.append(m.group(1))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        pass
    reader.join(timeout=5)
    run_id = found[0] if found else None
    if proc.poll() is None:
        proc.terminate()
        if run_id:
            subprocess.run(
                [str(cmd.BIN / "flwr"), "stop", run_id, args.connection], env=_env(args), timeout=60
            )
        print(f"deploy run: stopped after --timeout {args.timeout:.0f} s", file=sys.stderr)
        return 1
    if run_id is None:
        print("deploy run: the run did not start (see above)", file=sys.stderr)
        return 1
    status = _run_status(run_id, args)
    print(f"deploy run: run {run_id} status: {status}", flush=True)
    return 0 if "completed" in status else 1


# ---- site ------------------------------------------------------------------------------------------


def site_state_dir(state_dir: str, flwr_home: str | None) -> str:
    """``--state-dir``, or by default ``fedsamatch-site`` in the SuperNode's Flower home (``--flwr-home``,
    else Flower's own: $FLWR_HOME or ~/.flwr): without a folder, a SAM-Match site would embed all its
    slices again in every message, each a fresh process (docs/performance_log.md)."""
    if state_dir:
        return state_dir
    from flwr.supercore.utils import get_flwr_home  # here: importing Flower takes 0.4 s, the CLI 0.06 s

    home = Path(flwr_home) if flwr_home else get_flwr_home()
    return str(home.expanduser().resolve() / "fedsamatch-site")


def do_supernode(args: argparse.Namespace) -> int:
    site = cmd.SiteSpec(
        args.site_name,
        args.data_root,
        args.data_format,
        args.label_map,
        args.splits_file,
        args.site_index,
        site_state_dir(args.state_dir, args.flwr_home),
        args.task,
    )
    argv = cmd.supernode_argv(
        site,
        args.superlink,
        Path(args.ca) if args.ca else None,
        Path(args.key) if args.key else None,
        args.runtime_port,
        args.insecure_plaintext,
    )
    argv = cmd.node_argv(argv, RuntimeSettings.from_args(args))
    # The SuperNode's environment is its ClientApps': each message's process runs on this allocator.
    env = allocator.launch_env(args.allocator, _env(args, args.threads))
    print(f"deploy supernode: ClientApps run on {allocator.resolve(args.allocator, env)}", flush=True)
    _show(argv)
    if args.restart_delay <= 0:
        os.execve(argv[0], argv, env)
    return supervise(argv, env, args.restart_delay)


def supervise(argv: list[str], env: dict[str, str], delay: float) -> int:
    """Run ``argv`` and start it again ``delay`` s after it exits (the SuperLink refuses a node
    whose previous process it still believes online, for up to ~60 s after a crash); SIGTERM /
    SIGINT stop the child and this loop."""
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        child = subprocess.Popen(argv, env=env)
        rc = child.wait()
        if stopping:
            return rc
        print(f"deploy supernode: flower-supernode exited ({rc}); restarting in {delay:g} s", flush=True)
        end = time.monotonic() + delay
        while time.monotonic() < end and not stopping:
            time.sleep(0.2)
        if stopping:
            return rc


# ---- rehearsal -------------------------------------------------------------------------------------


def do_rehearse(args: argparse.Namespace) -> int:
    from deploy.rehearsal import Rehearsal, RehearsalConfig  # imports the data writer (numpy, nibabel)

    # Federated evaluation every round, as the app's default: round 2 trains from kept copies
    cfg = RehearsalConfig(sites=args.sites, rounds=args.rounds, timeout=args.timeout, evaluate_every=1)
    # SIGTERM (a CI timeout, systemd) must still stop every process the rehearsal started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return Rehearsal.main(Path(args.dir) if args.dir else None, cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certs", help="coordinator: private CA + SuperLink certificate (+ site keys)")
    p.add_argument("--pki", required=True, help="folder for ca/, superlink/, sites/")
    p.add_argument("--host", action="append", default=[], help="DNS name or IP the sites dial (repeat)")
    p.add_argument("--site", action="append", default=[], help="also make this site's key pair (rehearsal)")
    p.add_argument("--days", type=int, default=365, help="SuperLink certificate validity")
    p.add_argument("--renew-server", action="store_true", help="issue a new SuperLink certificate")
    p.add_argument("--new-ca", action="store_true", help="replace the CA (every site needs the new ca.pem)")
    p.add_argument("--force", action="store_true", help="replace existing site keys")
    p.set_defaults(func=do_certs)

    p = sub.add_parser("site-key", help="site: the SuperNode's key pair; send only the .pub")
    p.add_argument("--pki", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--force", action="store_true", help="rotate: replace the existing key")
    p.set_defaults(func=do_site_key)

    p = sub.add_parser("superlink", help="coordinator: start the SuperLink (TLS + node auth + state DB)")
    p.add_argument("--pki", required=True)
    p.add_argument("--state-dir", required=True, help=f"holds the SuperLink database ({cmd.DATABASE})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--flwr-home", help="FLWR_HOME of the SuperLink (installed app bundles)")
    p.add_argument("--insecure-plaintext", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=do_superlink)

    p = sub.add_parser("connect", help="coordinator: add the SuperLink connection to FLWR_HOME")
    p.add_argument("--flwr-home", required=True)
    p.add_argument("--name", required=True, help="connection name used by `flwr run . NAME`")
    p.add_argument("--address", required=True, help="host:port of the SuperLink")
    p.add_argument("--ca", help="the CA certificate (ca/ca.pem)")
    p.add_argument("--insecure-plaintext", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=do_connect)

    p = sub.add_parser("register", help="coordinator: register a site's public key at the SuperLink")
    p.add_argument("--public-key", required=True, help="the site's node.pub")
    p.add_argument("--site", required=True)
    p.add_argument("--connection", required=True)
    p.add_argument("--flwr-home")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=do_register)

    p = sub.add_parser("supernode", help="site: start the SuperNode next to the data")
    p.add_argument("--superlink", required=True, help="host:port of the coordinator's SuperLink")
    p.add_argument("--ca", help="the coordinator's CA certificate")
    p.add_argument("--key", help="this site's node.key")
    p.add_argument("--site-name", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--data-format", default="")
    p.add_argument("--label-map", default="")
    p.add_argument("--splits-file", default="")
    p.add_argument("--site-index", type=int, default=0, help="seeds this site's randomness")
    p.add_argument(
        "--state-dir",
        default="",
        help="site-local folder for FedBN state and SAM embeddings (default: FLWR_HOME/fedsamatch-site)",
    )
    p.add_argument("--task", default="", help="cross-task federation: this site's task in the run's manifest")
    p.add_argument("--runtime-port", type=int, default=9094, help="local ClientApp port (127.0.0.1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the ClientApp (0: torch's)")
    p.add_argument("--restart-delay", type=float, default=0.0, help=">0: restart after exits/crashes")
    add_runtime_arguments(p)
    allocator.add_allocator_argument(p)
    p.add_argument("--flwr-home")
    p.add_argument("--insecure-plaintext", action="store_true", help=INSECURE_HELP)
    p.set_defaults(func=do_supernode)

    p = sub.add_parser("run", help="coordinator: run the app on the SuperLink; exit 0 iff it completed")
    p.add_argument("--connection", required=True)
    p.add_argument("--out-dir", required=True, help="the ServerApp's run folder (results, last.pt)")
    p.add_argument("-c", "--run-config", action="append", default=[], help="extra k=v overrides")
    p.add_argument("--timeout", type=float, default=24 * 3600.0)
    p.add_argument("--flwr-home")
    p.set_defaults(func=do_run)

    p = sub.add_parser("rehearse", help="SuperLink + N SuperNodes on 127.0.0.1 with TLS + auth, a short run")
    p.add_argument("--dir", help="keep everything here (default: a temporary folder, removed)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole rehearsal")
    p.set_defaults(func=do_rehearse)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"deploy {args.command}: {exc}", file=sys.stderr)
        return 2
