"""Deployment building blocks without a network: certificates and keys, the command lines Flower
gets, the connection file, and stopping every process started (also escaped ones)."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from deploy import commands as cmd
from deploy.pki import PkiLayout, create_pki, create_site_key, issue_server_cert, server_cert_hosts
from deploy.procs import MARKER_ENV, ProcessSet, processes_with_marker
from federation.config import parse_run_config, site_from_node_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PkiLayout:
    return create_pki(tmp_path_factory.mktemp("pki"), ["fl.example.org", "10.1.2.3"], ["hospitalA"])


def test_certificates_and_keys(pki):
    # Assert: SANs, chain, usage, file modes, key formats Flower loads
    assert server_cert_hosts(pki.server_cert) == ["fl.example.org", "localhost", "10.1.2.3", "127.0.0.1"]
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (pki.ca_key, pki.server_key, pki.node_key("hospitalA")):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    key = load_ssh_private_key(pki.node_key("hospitalA").read_bytes(), None)
    pub = load_ssh_public_key(pki.node_pub("hospitalA").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    print("checked: SANs, CA chain, 0600 private keys, OpenSSH EC P-384 node key pair")


def test_tls_handshake_verifies_against_the_ca_only(pki, tmp_path):
    # Prepare: a TLS server with the SuperLink certificate on 127.0.0.1
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    # Execute / Assert: trusted with our CA; refused with the system store (no CA given)
    with_ca = ssl.create_default_context(cafile=str(pki.ca_cert))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with with_ca.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version()
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(timeout=5)
    listener.close()


def test_existing_keys_are_not_overwritten_unless_rotated(tmp_path):
    pki = create_pki(tmp_path, ["fl.example.org"], ["hospitalA"])
    with pytest.raises(FileExistsError, match="node.key: exists"):
        create_site_key(pki, "hospitalA")
    old = pki.node_pub("hospitalA").read_bytes()
    create_site_key(pki, "hospitalA", overwrite=True)  # rotation
    assert pki.node_pub("hospitalA").read_bytes() != old
    with pytest.raises(ValueError, match="site name"):
        create_site_key(pki, "../etc")
    issue_server_cert(pki, ["new.example.org"], overwrite=True)  # renewal keeps the CA
    assert "new.example.org" in server_cert_hosts(pki.server_cert)


def test_superlink_command_is_secure_by_default(pki, tmp_path):
    secure = cmd.superlink_argv(cmd.SuperLinkSpec(pki.root, tmp_path, "127.0.0.1", 9093))
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(pki.server_cert)
    assert secure[secure.index("--database") + 1] == str(tmp_path / "state.db")
    plain = cmd.superlink_argv(cmd.SuperLinkSpec(pki.root, tmp_path, insecure=True))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain
    with pytest.raises(FileNotFoundError, match="ca.pem: missing"):
        cmd.superlink_argv(cmd.SuperLinkSpec(tmp_path / "nothing", tmp_path))


def test_node_config_reaches_the_site_unchanged(pki, tmp_path):
    # Prepare
    site = cmd.SiteSpec("hospitalA", "/data/acdc h5", "acdc-h5", "chaos-liver", "", 2, "/var/fl/A", "acdc")

    # Execute: the string Flower parses, then the ClientApp's reading of it
    argv = cmd.supernode_argv(site, "fl.example.org:9093", pki.ca_cert, pki.node_key("hospitalA"))
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    manifest = tmp_path / "tasks.json"  # the coordinator's cross-task manifest (tasks only)
    manifest.write_text('{"tasks": {"acdc": {"model.num_classes": 4, "sam.enclosed": "2>3"}}, "sites": []}')
    cfg, fed = parse_run_config({"partition-manifest": str(manifest)})
    parsed = site_from_node_config(node_config, cfg, fed)

    # Assert
    assert parsed.name == "hospitalA" and parsed.index == 2
    assert dict(parsed.overrides) == {
        "data.root": "/data/acdc h5",
        "data.format": "acdc-h5",
        "data.label_map": "chaos-liver",
        "data.cache_dir": "/var/fl/A/slices",
        "sam.cache_dir": "/var/fl/A/sam_embeddings",
        "model.num_classes": 4,
        "sam.enclosed": "2>3",
    }
    assert parsed.task == "acdc"
    assert node_config["state-dir"] == "/var/fl/A"  # FedBN's per-round files (federation.site_state)
    assert "--auth-supernode-private-key" in argv and "--insecure" not in argv
    with pytest.raises(ValueError, match="quotes"):
        cmd.SiteSpec("x", 'a"b').node_config()


def test_site_state_dir_defaults_to_the_flower_home(tmp_path, monkeypatch):
    from deploy.cli import site_state_dir

    assert site_state_dir("/var/fl/A", str(tmp_path)) == "/var/fl/A"  # given: kept
    assert site_state_dir("", str(tmp_path)) == str(tmp_path.resolve() / "fedsamatch-site")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert site_state_dir("", None) == str((tmp_path / "home").resolve() / "fedsamatch-site")


def test_connection_file_is_read_by_flower(pki, tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    cmd.write_connection(tmp_path, "coordinator", "fl.example.org:9093", pki.ca_cert)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection(None)  # the default
    assert conn.name == "coordinator" and conn.address == "fl.example.org:9093"
    assert conn.root_certificates == str(pki.ca_cert.resolve()) and not conn.insecure


def test_run_command_always_resumes_and_packs(tmp_path):
    argv = cmd.run_argv("coordinator", tmp_path / "out", ["num-server-rounds=2"])
    assert argv[1:4] == ["run", str(REPO), "coordinator"]
    first = argv[argv.index("-c") + 1]
    assert 'resume-from="auto"' in first and "pack-arrays=true" in first and str(tmp_path / "out") in first
    assert "evaluate-then-train=true" in first
    assert argv[-2:] == ["-c", "num-server-rounds=2"]


def test_process_set_stops_trees_and_escaped_sessions(tmp_path):
    # Prepare: a process whose child escapes into its own session (as Flower's children do)
    script = "import subprocess, time; subprocess.Popen(['setsid', 'sleep', '300']); time.sleep(300)"
    procs = ProcessSet(tmp_path)
    proc = procs.start("escaper", [sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while len(processes_with_marker(procs.marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes_with_marker(procs.marker)) == 2
    assert f"{MARKER_ENV}={procs.marker}".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes()

    # Execute
    procs.stop_all(grace=2)

    # Assert
    left = processes_with_marker(procs.marker)
    print(f"checked: escaper and its setsid child stopped; left {left}")
    assert not left and not proc.running()


def test_cli_errors_are_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "deploy", "superlink", "--pki", str(tmp_path), "--state-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
    )
    assert res.returncode == 2
    assert (
        res.stderr.strip()
        == f"deploy superlink: {tmp_path}/ca/ca.pem: missing; create the certificates first (deploy certs)"
    )
