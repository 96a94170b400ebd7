"""`dentfed coordinator certs`: the CA's private key never sits among the files handed out."""

import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dentfed.cli import main


def test_ca_key_is_kept_apart_from_the_files_for_clinics(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["coordinator", "certs", "--out", str(out), "--clinics", "1"]) == 0
    printed = capsys.readouterr().out
    handed_out = {p.name for p in out.iterdir()}
    assert "ca.crt" in handed_out and not any(n.startswith("ca.key") for n in handed_out)
    keys = [p for p in tmp_path.rglob("ca.key")]
    assert len(keys) == 1, keys
    key = keys[0]
    assert out not in key.parents
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert str(key) in printed
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    priv = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert priv.public_key().public_numbers() == ca.public_key().public_numbers()
