"""`dentfed simulate --compare`: table building, argument parsing and one real tiny run
(pooled, two local-only baselines and a FedAvg Flower simulation on one split)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dentfed.cli import main
from shared.errors import ConfigError
from simulations.compare import (
    LONG_COLUMNS,
    budget_config,
    build_table,
    format_cell,
    parse_seeds,
    parse_strategies,
    table_markdown,
)
from tests.test_federation import _fed_config, two_clinic_simulation


def _long(rows: list[tuple[str, int, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "seed": s, "test_set": t, "metric": "macro_auc",
                          "value": v} for m, s, t, v in rows], columns=list(LONG_COLUMNS))


def test_table_rows_columns_and_mean_sd_cells():
    rows = []
    # deliberately scrambled: strategies before baselines, Local 10 before Local 2
    for method in ("fedprox", "Local 10", "fedavg", "Local 2", "Pooled", "Local 0"):
        for seed, base in ((0, 0.6), (1, 0.8)):
            for test_set in ("pooled", "clinic 1", "clinic 0"):
                rows.append((method, seed, test_set, base))
    long = _long(rows)
    long.loc[(long["method"] == "fedavg") & (long["test_set"] == "clinic 1"), "value"] = math.nan
    long.loc[(long["method"] == "Local 0") & (long["test_set"] == "clinic 0")
             & (long["seed"] == 1), "value"] = math.nan
    table = build_table(long, strategies=["fedavg", "fedprox"])
    assert list(table.index) == ["Pooled", "Local 0", "Local 2", "Local 10", "fedavg", "fedprox"]
    assert list(table.columns) == ["clinic 0 test", "clinic 1 test", "pooled test"]
    assert table.loc["Pooled", "pooled test"] == "0.700 ± 0.141"  # sample sd of 0.6, 0.8
    assert table.loc["fedavg", "clinic 1 test"] == "undef"
    assert table.loc["Local 0", "clinic 0 test"] == "0.600 (n=1/2)"
    # without an explicit strategy list: order of first appearance
    assert list(build_table(long).index)[-2:] == ["fedprox", "fedavg"]
    one = build_table(long[long["seed"] == 0].assign(value=1.0))
    assert one.loc["Pooled", "pooled test"] == "1.000"
    assert re.search(r"\| +1\.000 \|", table_markdown(one))  # not re-parsed into '1'


def test_format_cell_single_seed_and_undefined():
    assert format_cell([0.81234]) == "0.812"
    assert format_cell([math.nan]) == "undef"
    assert format_cell([0.5, 0.5, 0.5]) == "0.500 ± 0.000"


def test_table_refuses_mixed_metrics():
    long = _long([("Pooled", 0, "pooled", 0.5)])
    long.loc[1] = ["Pooled", 0, "clinic 0", "balanced_accuracy", 0.4]
    with pytest.raises(ValueError, match="one metric"):
        build_table(long)


def test_parsers_and_budget():
    assert parse_strategies("fedavg, FedProx") == ["fedavg", "fedprox"]
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("fedmagic", "fedavg,fedavg", ","):
        with pytest.raises(ConfigError):
            parse_strategies(bad)
    for bad in ("a", "1,1", ""):
        with pytest.raises(ConfigError):
            parse_seeds(bad)
    cfg = _fed_config(rounds=3, local_epochs=2)
    b = budget_config(cfg, seed=7)
    assert (b.train.epochs, b.train.seed, b.train.max_steps_per_epoch) == (6, 7, None)
    b = budget_config(_fed_config(rounds=3, local_steps=5), seed=0)
    assert (b.train.epochs, b.train.max_steps_per_epoch) == (3, 5)  # one clinic (local)
    b = budget_config(_fed_config(rounds=3, local_steps=5), seed=0, clinics=4)
    assert (b.train.epochs, b.train.max_steps_per_epoch) == (3, 20)  # pooled: all 4 clinics


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg_path = tmp_path / "fed.yaml"
    cfg_path.write_text(yaml.safe_dump(_fed_config().model_dump(mode="json")))
    base = ["simulate", "--config", str(cfg_path), "--out", str(tmp_path / "o")]
    for extra, msg in ((["--compare", "--seeds", "x"], "--seeds must be"),
                       (["--compare", "--strategies", "fedmagic"], "unknown strategy fedmagic"),
                       (["--seeds", "0"], "only apply with --compare"),
                       (["--compare", "--strategy", "fedavg"], "use --strategies")):
        assert main(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    assert main(base + ["--compare", "--manifest", str(tmp_path / "none.csv")]) == 1
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow  # real Flower simulation
def test_real_compare_run_two_clinics(tmp_path):
    cfg_path, manifest = two_clinic_simulation(tmp_path, rounds=1, local_epochs=1)
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(manifest), "--out",
                        str(out), "--compare", "--strategies", "fedavg", "--seeds", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("compare.csv", "compare.md", "compare.json", "split/server_test.csv",
                 "federated/seed_0/fedavg/model_final.pt"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".cmp*")), "partial/work folders left behind"
    for method in ("Pooled", "Local 0", "Local 1", "fedavg"):
        assert f"[seed 0] {method}: done in" in r.stderr

    long = pd.read_csv(out / "compare.csv")
    assert list(long.columns) == list(LONG_COLUMNS)
    assert set(long["metric"]) == {"macro_auc"} and set(long["seed"]) == {0}
    assert len(long) == 4 * 3  # 4 methods x (2 clinic test sets + pooled)
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in long["value"])

    table = build_table(long, ["fedavg"])
    assert list(table.index) == ["Pooled", "Local 0", "Local 1", "fedavg"]
    assert list(table.columns) == ["clinic 0 test", "clinic 1 test", "pooled test"]
    for cell in table.to_numpy().ravel():
        assert cell == "undef" or 0.0 <= float(cell) <= 1.0, cell
    md = (out / "compare.md").read_text()
    assert "macro_auc" in md and "--compare" in md and "| Local 1 " in md
    assert re.search(r"\| fedavg +\| +(\d\.\d{3}|undef) \|", md), md
    assert "| pooled test" in r.stdout or "pooled test |" in r.stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["metric"] == "macro_auc" and data["strategies"] == ["fedavg"]
    runs = {(x["method"], x["seed"]): x for x in data["runs"]}
    assert runs[("Pooled", 0)]["epochs_run"] == 1  # the budget: 1 round x 1 local epoch
    assert runs[("Local 0", 0)]["train_images"] < runs[("Pooled", 0)]["train_images"]
