"""All-or-nothing writes (shared/atomic_files.py) and the commands that rely on them: a failed
write leaves the old content or nothing, never a temporary or half-written file or folder."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dentfed import pki
from shared.atomic_files import atomic_folder, torch_save_atomic, write_json, write_text_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_atomic_leaves_no_temporary_file_when_the_write_fails(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(tmp_path / "a.txt", "half \ud800 written")  # lone surrogate
    assert _names(tmp_path) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_torch_save_atomic_leaves_no_temporary_file_when_pickling_fails(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        torch_save_atomic({"f": lambda: 0}, tmp_path / "m.pt")
    assert _names(tmp_path) == []


def test_atomic_folder_is_all_or_nothing_and_replace_swaps_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("interrupted")
    assert _names(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(FileExistsError), atomic_folder(out):
        pass
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert _names(out) == ["b.txt"] and _names(tmp_path) == ["out"]


def test_certs_write_nothing_when_interrupted(tmp_path, monkeypatch):
    made = []

    def failing_key(path, overwrite=False):
        if made:
            raise KeyboardInterrupt
        made.append(path)
        return real(path, overwrite=overwrite)

    real = pki.make_clinic_key
    monkeypatch.setattr(pki, "make_clinic_key", failing_key)
    with pytest.raises(KeyboardInterrupt):
        pki.make_certificates(tmp_path / "certs", clinics=3)
    assert _names(tmp_path) == []  # no certs/ and no hidden partial folder
    monkeypatch.setattr(pki, "make_clinic_key", real)
    c = pki.make_certificates(tmp_path / "certs", clinics=2)
    assert {"ca.crt", "server.crt", "server.key", "clinic_0", "clinic_1.pub"} <= set(
        _names(tmp_path / "certs"))
    assert stat.S_IMODE(c.server_key.stat().st_mode) == 0o600
    assert c.clinic_keys[1].is_file() and _names(tmp_path) == ["certs", "certs-ca-private"]
    assert c.ca_key == tmp_path / "certs-ca-private" / "ca.key" and c.ca_key.is_file()


def test_write_json_turns_nan_into_null_and_numpy_scalars_into_numbers(tmp_path):
    import json

    import numpy as np

    write_json(tmp_path / "m.json", {"auc": float("nan"), "n": np.int64(3),
                                     "rows": [{"f1": np.float32(0.5)}, np.float64("nan")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {
        "auc": None, "n": 3, "rows": [{"f1": 0.5}, None]}
