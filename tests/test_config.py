from pathlib import Path

import pytest

from shared.config import config_from_dict, load_config
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = {"task": {"type": "multilabel", "labels": ["a", "b"]}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.task.labels or cfg.task.type == "pretrain"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key"):
        config_from_dict({**BASE, "train": {"epocs": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        config_from_dict({**BASE, "train": {"epochs": "many"}})


def test_multiclass_needs_label_column_and_ce():
    with pytest.raises(ConfigError, match="label_column"):
        config_from_dict({"task": {"type": "multiclass", "labels": ["x", "y"]}})
    with pytest.raises(ConfigError, match="multiclass task uses 'ce'"):
        config_from_dict({"task": {"type": "multiclass", "labels": ["x", "y"],
                                   "label_column": "c"}, "train": {"loss": "dice"}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_minimal_multiclass_config_defaults_to_ce():
    cfg = config_from_dict({"task": {"type": "multiclass", "labels": ["x", "y"],
                                     "label_column": "c"}})
    assert cfg.train.loss == "ce"
    assert config_from_dict(BASE).train.loss == "bce"


def test_server_lr_default_follows_strategy():
    from server.strategy import make_strategy

    avgm = make_strategy(config_from_dict({**BASE, "federation": {"strategy": "fedavgm"}})
                         .federation)
    assert avgm.server_learning_rate == 1.0
    adam = make_strategy(config_from_dict({**BASE, "federation": {"strategy": "fedadam"}})
                         .federation)
    assert adam.eta == 0.01
    mine = make_strategy(config_from_dict(
        {**BASE, "federation": {"strategy": "fedavgm", "server_lr": 0.5}}).federation)
    assert mine.server_learning_rate == 0.5


def test_overrides_go_through_cross_field_rules():
    from shared.config import with_overrides

    cfg = load_config(REPO / "configs" / "demo-photos-dp.yaml")
    with pytest.raises(ConfigError, match="fedprox"):
        with_overrides(cfg, {"federation.strategy": "fedprox"})
    ok = with_overrides(cfg, {"federation.rounds": 2, "split.clinics": 3})
    assert (ok.federation.rounds, ok.split.clinics) == (2, 3)
    assert cfg.federation.rounds != 2 or cfg.split.clinics != 3  # the original is unchanged
    with pytest.raises(ConfigError, match="federation.rounds"):
        with_overrides(cfg, {"federation.rounds": 0})


def test_cli_override_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """`dentfed simulate --config demo-photos-dp.yaml --strategy fedprox`: one error line, exit
    1, no split and no Flower."""
    import simulations.simulate
    from dentfed.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("simulate started despite an invalid override")

    monkeypatch.setattr(simulations.simulate, "simulate", must_not_run)
    monkeypatch.setattr(simulations.simulate, "prepare_split", must_not_run)
    out = tmp_path / "run"
    rc = main(["simulate", "--config", str(REPO / "configs" / "demo-photos-dp.yaml"),
               "--strategy", "fedprox", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: ") and "fedprox" in err[0], err
    assert not out.exists()


def test_coordinator_run_validates_config_before_flwr_run(tmp_path, monkeypatch, capsys):
    import subprocess

    from dentfed.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("flwr run started with an invalid config")

    monkeypatch.setattr(subprocess, "run", must_not_run)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {type: multilabel, labels: [a]}\nfederation: {rounds: 0}\n")
    rc = main(["coordinator", "run", "--config", str(bad), "--run-dir", str(tmp_path / "r"),
               "--home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert rc == 1 and "federation.rounds" in err


def test_secagg_shares_and_threshold_follow_flowers_rules_at_load():
    ok = config_from_dict({**BASE, "privacy": {"secagg": {"num_shares": 3,
                                                          "reconstruction_threshold": 2}}})
    assert ok.privacy.secagg.num_shares == 3
    assert config_from_dict({**BASE, "privacy": {"secagg": {}}}).privacy.secagg.num_shares == 1.0
    for bad, match in (({"num_shares": 2}, "1 .all clinics. or more than 2"),
                       ({"num_shares": 3, "reconstruction_threshold": 3}, "less than num_shares"),
                       ({"reconstruction_threshold": 1.5}, "at most 1")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**BASE, "privacy": {"secagg": bad}})
