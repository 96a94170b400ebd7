"""The one model-file format (shared/model_file.py): what is written is what is read back."""

from __future__ import annotations

import pytest
import torch

from shared.config import config_from_dict
from shared.errors import DentfedError
from shared.model_file import read_model_file, save_model_file
from shared.models import build_model, trainable_state_keys


def _cfg(freeze: int = 0):
    return config_from_dict({
        "task": {"type": "multilabel", "labels": ["a", "b", "c"]},
        "data": {"image_size": 32},
        "model": {"name": "resnet18", "freeze": freeze},
        "train": {"loss": "bce"},
    })


def test_round_trip_gives_the_same_model_thresholds_and_trainable_keys(tmp_path):
    cfg = _cfg(freeze=2)
    torch.manual_seed(1)
    model = build_model(cfg.model, 3, 32).eval()
    save_model_file(tmp_path / "model.pt", model, cfg, [0.2, 0.5, 0.7])
    mf = read_model_file(tmp_path)  # a run folder finds model.pt
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(mf.model(x), model(x), atol=1e-6)
    assert mf.thresholds == [0.2, 0.5, 0.7]
    assert mf.trainable_keys == trainable_state_keys(model) != list(model.state_dict())
    assert mf.cfg.model_dump() == cfg.model_dump()
    assert mf.path == tmp_path / "model.pt"


def test_a_file_of_another_kind_is_one_clear_error(tmp_path):
    cfg = _cfg()
    torch.save(build_model(cfg.model, 3, 32).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(DentfedError, match="weights.pt: not a dentfed checkpoint"):
        read_model_file(tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DentfedError, match="junk.pt: not a readable dentfed checkpoint"):
        read_model_file(tmp_path / "junk.pt")
    with pytest.raises(DentfedError, match="no model.pt or model_final.pt"):
        read_model_file(tmp_path)
