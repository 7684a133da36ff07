"""``protofuse certs init``: every key and certificate a deployment needs, made with
``cryptography``.

One folder holds them all (the operator copies the public parts to organizations):

    ca.crt  ca.key            the deployment's own certificate authority (ECDSA P-384)
    server.crt  server.key    the SuperLink's, the proxy's and the adaptation service's TLS identity
    client.crt  client.key    a caller of the adaptation service (mutual TLS)
    supernodes/node-<i>.key   SuperNode authentication keys (EC P-384, OpenSSH, as Flower wants)
    supernodes/node-<i>.pub
    signing.key  signing.pub  Ed25519: the service signs every adapted model with it

Private keys are written with mode 0600 and never overwritten: ``init`` refuses a folder that
already has a CA, so re-running it cannot silently invalidate every issued certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names every server certificate carries: local processes and the compose services' DNS names.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "superlink", "proxy", "service")
VALID_DAYS = 825  # the longest server-certificate lifetime common clients accept


class CertsError(ValueError):
    """The certificates folder cannot be created as asked."""


def init(
    out: Path, names: Iterable[str] = (), supernodes: int = 3, days: int = VALID_DAYS
) -> list[Path]:
    """Create the CA, server and client certificates, SuperNode keys and the signing key in
    ``out``."""
    out = Path(out)
    if (out / "ca.crt").exists():
        raise CertsError(
            f"{out} already holds a CA (ca.crt); remove the folder to start over, or keep using it"
        )
    if supernodes < 0:
        raise CertsError(f"--supernodes {supernodes}: give 0 or more")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "protofuse deployment CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    written += [
        _write_key(out / "ca.key", ca_key),
        _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
    ]
    all_names = list(dict.fromkeys([*DEFAULT_NAMES, *names]))
    for stem, usage, san in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, all_names),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ["protofuse-client"]),
    ):
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (
            _builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"protofuse {stem}")]),
                ca_name,
                key.public_key(),
                now,
                days,
            )
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in san]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA384())
        )
        written += [
            _write_key(out / f"{stem}.key", key),
            _write(out / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
        ]
    for i in range(supernodes):
        written += supernode_key(out / "supernodes", f"node-{i}")
    signing = ed25519.Ed25519PrivateKey.generate()
    written.append(_write_key(out / "signing.key", signing))
    written.append(
        _write(
            out / "signing.pub",
            signing.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    )
    return written


def supernode_key(folder: Path, name: str) -> list[Path]:
    """One SuperNode's authentication key pair: private (PEM, OpenSSH) and public (OpenSSH line)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{name}.key").exists():
        raise CertsError(f"{folder / name}.key exists; choose another name")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return [
        _write(folder / f"{name}.key", private, private=True),
        _write(folder / f"{name}.pub", public + b"\n"),
    ]


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key) -> Path:
    fmt = serialization.PrivateFormat.PKCS8
    return _write(
        path,
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()),
        private=True,
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    # Created with its final mode: a private key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
