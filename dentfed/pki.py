"""Throw-away certificates and clinic keys for first set-ups and tests (`dentfed coordinator
certs`). A production federation should use the hospital's own CA; the files have the same
roles: `ca.crt` (clinics and the coordinator's CLI trust it), `server.crt`/`server.key`
(the SuperLink's TLS identity), and per clinic an EC P-384 key pair in OpenSSH format
(`clinic_K` private, stays at the clinic; `clinic_K.pub` registered with `flwr supernode
register`). Private keys are written with mode 0600. The CA's private key `ca.key` signs
certificates and goes to nobody: it is written apart from the folder whose files are handed
out, to `<out>-ca-private/` (folder 0700, key 0600) unless another folder is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic_files import atomic_folder, write_bytes_atomic
from shared.errors import DentfedError


@dataclass
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    clinic_keys: list[Path]  # private keys; the public key is the same path + ".pub"
    ca_key: Path | None = None  # kept apart from `out` (see module docstring)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    write_bytes_atomic(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dentfed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_certificates(out: str | Path, clinics: int, hosts: list[str] | None = None,
                      days: int = 365, overwrite: bool = False,
                      ca_key_dir: str | Path | None = None) -> Certificates:
    """A CA, a server certificate valid for `hosts` (names and IPs the clinics dial), and
    `clinics` SuperNode key pairs. Refuses to overwrite an existing set unless asked. The CA
    key goes to `ca_key_dir` (default `<out>-ca-private`), never into `out`."""
    out = Path(out)
    key_dir = Path(ca_key_dir) if ca_key_dir else out.parent / f"{out.name}-ca-private"
    if key_dir.resolve() == out.resolve() or out.resolve() in key_dir.resolve().parents:
        raise DentfedError("the CA key folder must be outside the folder handed to clinics")
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    if clinics < 0:
        raise DentfedError("--clinics must be >= 0")
    if ((out / "ca.crt").exists() or (key_dir / "ca.key").exists()) and not overwrite:
        raise DentfedError(f"{out} already holds certificates; use another folder or --force")
    if out.exists() and any(out.iterdir()) and not (out / "ca.crt").exists():
        raise DentfedError(f"{out} exists and holds other files; choose an empty or new folder")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("dentfed throw-away CA")
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA384()))
    # All or nothing: the set is built in a hidden folder beside `out` and renamed into place
    # (replacing a previous set as a whole with --force), so a failure leaves no partial set.
    # The CA key is written last inside the block: if it fails, no certificate set appears.
    with atomic_folder(out, replace=overwrite) as tmp:
        _write(tmp / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(tmp / "server.key", _pem_key(srv_key), private=True)
        _write(tmp / "server.crt", srv_cert.public_bytes(serialization.Encoding.PEM))
        for k in range(clinics):
            make_clinic_key(tmp / f"clinic_{k}", overwrite=True)
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)
        _write(key_dir / "ca.key", _pem_key(ca_key), private=True)
    keys = [out / f"clinic_{k}" for k in range(clinics)]
    return Certificates(out / "ca.crt", out / "server.crt", out / "server.key", keys,
                        key_dir / "ca.key")


def make_clinic_key(path: str | Path, overwrite: bool = False) -> Path:
    """One SuperNode identity: EC P-384 private key (OpenSSH, 0600) at `path` and its public
    key at `path.pub`, the file the coordinator registers."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DentfedError(f"{path} exists; refusing to replace a clinic's key")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"),
           key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH) + b"\n")
    return path
