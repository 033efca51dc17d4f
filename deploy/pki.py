"""Certificates and keys for a deployment: a private CA, the SuperLink's TLS certificate, and one
SuperNode key pair per site.

Layout under one folder (``deploy certs`` / ``deploy site-key`` write it; nothing here is a secret
except the files marked 0600):

```
ca/ca.pem               CA certificate: every site and every `flwr` user gets a copy
ca/ca.key        0600   CA private key: keep offline; needed only to issue a new server certificate
superlink/server.pem    SuperLink certificate (SANs: the given host names and addresses + localhost)
superlink/server.key 0600
sites/<site>/node.key 0600   the site's SuperNode authentication key (OpenSSH, EC P-384): never leaves
sites/<site>/node.pub        its public key, registered at the SuperLink (`flwr supernode register`)
```

Flower 1.42 wants the node key as an OpenSSH EC key on a NIST curve (``flower-supernode
--auth-supernode-private-key``; ``flwr supernode register`` reads the ``.pub``), and the SuperLink's
``--ssl-ca-certfile`` / ``--ssl-certfile`` / ``--ssl-keyfile`` as PEM files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # Flower's own choice for node keys; also fine for TLS
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ALWAYS_SANS = ("localhost", "127.0.0.1")  # the SuperLink's own SuperExec connects over loopback


@dataclass(frozen=True)
class PkiLayout:
    """Where each file of a deployment's PKI lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / check_site_name(site)

    def node_key(self, site: str) -> Path:
        return self.site_dir(site) / "node.key"

    def node_pub(self, site: str) -> Path:
        return self.site_dir(site) / "node.pub"


def check_site_name(site: str) -> str:
    if not SITE_NAME.match(site):
        raise ValueError(f"site name {site!r}: use letters, digits, '.', '_', '-' (at most 63)")
    return site


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
    return path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsamatch deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, *ALWAYS_SANS]):  # ordered, unique
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(layout: PkiLayout, days: int = 3650, overwrite: bool = False) -> Path:
    """A self-signed CA (EC P-384) that signs only the SuperLink certificate."""
    key = ec.generate_private_key(CURVE())
    name = _name("fedsamatch private CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(layout.ca_key, _pem_key(key), private=True, overwrite=overwrite)
    return _write(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM), False, overwrite)


def _load_ca(layout: PkiLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    for path in (layout.ca_cert, layout.ca_key):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no CA here; create it first (deploy certs)")
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{layout.ca_key}: not an EC private key")
    return cert, key


def issue_server_cert(
    layout: PkiLayout, hosts: Iterable[str], days: int = 365, overwrite: bool = False
) -> Path:
    """The SuperLink's TLS certificate, signed by the CA, valid for ``hosts`` (DNS names or IP
    addresses the sites dial) plus localhost / 127.0.0.1. Re-run with ``overwrite`` to rotate it."""
    ca_cert, ca_key = _load_ca(layout)
    hosts = list(hosts)
    key = ec.generate_private_key(CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(layout.server_key, _pem_key(key), private=True, overwrite=overwrite)
    return _write(layout.server_cert, cert.public_bytes(serialization.Encoding.PEM), False, overwrite)


def create_site_key(layout: PkiLayout, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """The site's SuperNode key pair (OpenSSH, EC P-384). Run it at the site: only ``node.pub``
    travels to the coordinator. ``overwrite`` rotates it (then register the new public key)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv = _write(layout.node_key(site), private, private=True, overwrite=overwrite)
    pub = _write(layout.node_pub(site), public + f" {site}\n".encode(), private=False, overwrite=overwrite)
    return priv, pub


def server_cert_hosts(path: Path) -> list[str]:
    """The SAN entries of a certificate (to check what a SuperLink certificate is valid for)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def create_pki(root: Path, hosts: Iterable[str], sites: Iterable[str], overwrite: bool = False) -> PkiLayout:
    """CA + SuperLink certificate + one key pair per site (the local rehearsal makes all of them on
    one machine; a real deployment runs :func:`create_site_key` at each site)."""
    layout = PkiLayout(Path(root))
    create_ca(layout, overwrite=overwrite)
    issue_server_cert(layout, hosts, overwrite=overwrite)
    for site in sites:
        create_site_key(layout, site, overwrite=overwrite)
    return layout
