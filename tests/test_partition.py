"""Virtual-clinic splits: every row once, patients never split, deterministic, skew by alpha."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import config_from_dict, dump_config, with_overrides
from shared.data.manifest import read_manifest
from shared.errors import ConfigError
from simulations.partition import read_raw, skew, split_clinics, write_split
from tests.conftest import tiny_config, write_tiny_multilabel

REPO = Path(__file__).resolve().parents[1]


def _multiclass_manifest(root, n_patients=120, seed=0):
    """Images of 4 classes, 1-3 images per patient, 3 sites; files are real PNGs."""
    rng = np.random.default_rng(seed)
    src = write_tiny_multilabel(root, n=8, size=16)
    rows = []
    for p in range(n_patients):
        cls = rng.choice(["a", "b", "c", "d"], p=[0.4, 0.3, 0.2, 0.1])
        for _ in range(rng.integers(1, 4)):
            rows.append({"path": f"img/{len(rows) % 8}.png", "patient_id": f"P{p}",
                         "site": f"s{p % 3}", "cls": cls})
    df = pd.DataFrame(rows)
    # distinct paths are not required by the splitter; the manifest reader does require them
    for i in range(len(df)):
        (root / "img" / f"{i}.png").write_bytes((root / "img" / f"{i % 8}.png").read_bytes())
        df.loc[i, "path"] = f"img/{i}.png"
    df.to_csv(src, index=False)
    return src


def _cfg(**split):
    return config_from_dict({"task": {"type": "multiclass", "labels": ["a", "b", "c", "d"],
                                      "label_column": "cls"}, "train": {"loss": "ce"},
                             "split": {"clinics": 4, **split}})


@pytest.fixture
def mc(tmp_path):
    path = _multiclass_manifest(tmp_path / "mc")
    cfg = _cfg()
    return read_manifest(path, cfg.task), read_raw(path)


@pytest.mark.parametrize("scheme", ["iid", "site", "dirichlet", "quantity", "pathological"])
def test_invariants(mc, scheme):
    m, raw = mc
    clinics = 3 if scheme == "site" else 4
    cfg = _cfg(scheme=scheme, clinics=clinics, alpha=0.5, seed=3)
    sp = split_clinics(m, raw, cfg)
    rows = np.concatenate([np.concatenate(list(c.values())) for c in sp.clinics])
    assert sorted(rows) == list(range(len(m)))  # every row exactly once
    owner = {}
    for c, parts in enumerate(sp.clinics):
        for name, idx in parts.items():
            for pid in set(m.patient_ids[idx]):
                assert owner.setdefault(pid, (c, name)) == (c, name), pid  # one clinic+split
    again = split_clinics(m, raw, cfg)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(sp.clinics, again.clinics,
                                                           strict=True) for k in a)
    if scheme == "site":
        for parts in sp.clinics:
            allr = np.concatenate(list(parts.values()))
            assert len(set(m.sites[allr])) == 1


def test_dirichlet_skew_grows_as_alpha_falls(mc):
    m, raw = mc
    skews = {a: np.mean([skew(m, split_clinics(m, raw, _cfg(scheme="dirichlet", alpha=a,
                                                               seed=s))) for s in range(5)])
             for a in (100.0, 1.0, 0.1)}
    assert skews[100.0] < skews[1.0] < skews[0.1], skews


def test_written_split_and_errors(mc, tmp_path):
    m, raw = mc
    sp = split_clinics(m, raw, _cfg(scheme="iid"))
    write_split(m, raw, sp, tmp_path / "out")
    test = pd.read_csv(tmp_path / "out" / "server_test.csv")
    assert len(test) == sum(len(c["test"]) for c in sp.clinics)
    local = pd.read_csv(tmp_path / "out" / "clinic_0" / "manifest.csv")
    assert set(local["split"]) == {"train", "val"}
    assert (tmp_path / "out" / "label_distribution.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="needs at least 5 sites"):
        split_clinics(m, raw, _cfg(scheme="site", clinics=5))
    with pytest.raises(ConfigError, match="split.by column 'nope'"):
        split_clinics(m, raw, _cfg(scheme="dirichlet", by="nope"))


def test_the_simulate_parent_splits_without_loading_torch(tiny_manifest, tmp_path):
    """`dentfed simulate`'s own process only splits and waits for Flower: importing torch
    there cost ~0.65 GiB of the 10-clinic memory budget (docs/speed.md, "Memory")."""
    cfg = with_overrides(tiny_config(), {"split.clinics": 2, "split.scheme": "iid"})
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    code = (
        "import sys; from pathlib import Path\n"
        "import dentfed.cli, simulations.simulate as s\n"
        "from shared.config import load_config\n"
        f"cfg = load_config({str(tmp_path / 'c.yaml')!r})\n"
        f"s.prepare_split(cfg, {str(tiny_manifest)!r}, Path({str(tmp_path / 'split')!r}))\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert (tmp_path / "split" / "clinic_1" / "manifest.csv").is_file()
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
