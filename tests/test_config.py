from pathlib import Path

import pytest

from shared.config import config_from_dict, load_config
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = {"task": {"type": "multilabel", "labels": ["a", "b"]}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.task.labels


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
