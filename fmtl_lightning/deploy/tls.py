"""Self-signed TLS material for a SuperLink (a CA and a server certificate it signs), and
the EC key pairs of SuperNode authentication.

``write_certificates(out_dir, hosts)`` writes ``ca.crt``, ``ca.key``, ``server.pem``
and ``server.key``. The server certificate's subject alternative names are the given
host names and IP addresses (always including ``localhost`` and ``127.0.0.1``), so
SuperNodes and ``flwr`` verify the SuperLink with ``ca.crt`` alone. For a real
deployment, use certificates from your organisation's CA; this is for labs, tests
and two-machine trials. ``write_node_key(out_dir, "c00")`` writes one SuperNode's key
pair (``c00``, ``c00.pub``). Needs the ``cryptography`` package (installed with flwr).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path  # give to SuperNodes (--root-certificates) and flwr (root-certificates)
    ca_key: Path  # keep offline
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile


def _san(hosts: Sequence[str]):
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def write_certificates(
    out_dir: str | os.PathLike[str], hosts: Sequence[str] = (), *, days: int = 365
) -> CertPaths:
    """Create a CA and a server certificate for ``hosts`` (names or IPs) in ``out_dir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fmtl-lightning test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    first = (list(hosts) or ["localhost"])[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for p, k in ((paths.ca_key, ca_key), (paths.server_key, key)):
        p.write_bytes(key_pem(k))
        p.chmod(0o600)
    return paths


@dataclass(frozen=True)
class NodeKey:
    private: (
        Path  # the SuperNode's --auth-supernode-private-key (OpenSSH format); stays on the node
    )
    public: Path  # ``flwr supernode register PUBLIC`` on the SuperLink's side (OpenSSH format)


def write_node_key(out_dir: str | os.PathLike[str], name: str) -> NodeKey:
    """An EC P-384 key pair for one SuperNode (Flower's SuperNode authentication):
    ``out_dir/name`` (private, mode 0600) and ``out_dir/name.pub``, both in the OpenSSH
    formats ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
    register`` read (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    paths = NodeKey(out / name, out / f"{name}.pub")
    paths.private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    paths.private.chmod(0o600)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    paths.public.write_bytes(pub + f" fmtl-node-{name}\n".encode())
    return paths
