"""SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod through the dentfed ClientApp): the
aggregate equals plain FedAvg within the quantisation error, and a clinic that drops out during
the masked-vector stage (above the reconstruction threshold) does not stop the round.

The clinics are the real dentfed ClientApp, called in-process by a small Grid that delivers each
message to the destination node's ClientApp with that node's own persistent Context (what a
SuperNode does), so the test runs the whole protocol without starting Flower's runtime."""

from __future__ import annotations

import copy
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.app import app as client_app
from server.secagg import run_secagg_federation
from shared.config import config_from_dict
from tests.test_federation import _task_identity, two_clinic_simulation

__all__ = ["_task_identity"]


class InProcessGrid:
    """Delivers messages to the dentfed ClientApp, one persistent Context per node; `drop` maps
    a node id to the SecAgg+ stage at which it stops answering."""

    def __init__(self, manifests: dict[int, str], drop: dict[int, str] | None = None):
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"manifest": m},
                                      state=RecordDict(), run_config={})
                         for nid, m in manifests.items()}
        self.drop = drop or {}
        self.gone: set[int] = set()
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # each node gets its own copy, as over the wire
            nid = msg.metadata.dst_node_id
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and nid in self.drop and self.drop[nid] == cfg.get("stage"):
                self.gone.add(nid)
            if nid in self.gone:
                continue
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = client_app(msg, self.contexts[nid])
            reply.metadata.__dict__["_src_node_id"] = nid
            replies.append(reply)
        return replies


def _setup(tmp_path, clinics: int):
    from simulations.simulate import prepare_split

    cfg_path, manifest = two_clinic_simulation(tmp_path, rounds=1, local_steps=1)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["freeze"] = 4
    raw["split"]["clinics"] = clinics
    raw["federation"].update(min_train_clinics=clinics, min_available_clinics=clinics,
                             min_evaluate_clinics=clinics)
    raw["privacy"] = {"secagg": {"num_shares": clinics, "reconstruction_threshold": 2,
                                 "max_weight": 100}}
    cfg = config_from_dict(raw)
    prepare_split(cfg, manifest, tmp_path / "split")
    manifests = {10 + i: str(tmp_path / "split" / f"clinic_{i}" / "manifest.csv")
                 for i in range(clinics)}
    return cfg, manifests, tmp_path / "split" / "server_test.csv"


def _server_context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.slow  # two in-process SecAgg+ federations
def test_secagg_aggregate_equals_plain_fedavg(tmp_path):
    cfg, manifests, test = _setup(tmp_path, 3)
    plain = run_secagg_federation(InProcessGrid(manifests), _server_context(), cfg, test,
                                  secure=False)
    secure = run_secagg_federation(InProcessGrid(manifests), _server_context(), cfg, test)
    a, b = plain.evaluator.final_state, secure.evaluator.final_state
    assert set(a) == set(b)
    diffs = [float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a
             if a[k].is_floating_point()]
    # Each clinic sends round(w * n/max_weight * Q / (2 * clip)): an error of at most half a
    # step, step = 2 * clip / Q, on w * n/max_weight; the sum is divided by sum(n)/max_weight.
    # With 3 clinics of >= 10 training images the aggregate is off by < 3 * step * 100 / 30.
    s = cfg.privacy.secagg
    step = 2 * s.clipping_range / s.quantization_range
    assert 0 < max(diffs) < 3 * step * s.max_weight / 30, max(diffs)
    assert plain.evaluator.history[0] == secure.evaluator.history[0]
    assert plain.evaluator.history[1]["loss"] != plain.evaluator.history[0]["loss"]
    assert secure.evaluator.history[1]["loss"] == pytest.approx(
        plain.evaluator.history[1]["loss"], abs=1e-3)
    assert secure.train_aggregated[1]["train_loss"] == pytest.approx(
        plain.train_aggregated[1]["train_loss"])


def test_secagg_round_survives_a_dropout_above_threshold(tmp_path):
    cfg, manifests, test = _setup(tmp_path, 3)
    grid = InProcessGrid(manifests, drop={12: "collect_masked_vectors"})
    res = run_secagg_federation(grid, _server_context(), cfg, test)
    assert grid.gone == {12}
    assert set(res.evaluator.history) == {0, 1}  # the round completed and was evaluated
    before, after = res.evaluator.history[0], res.evaluator.history[1]
    assert np.isfinite(after["loss"]) and after["loss"] != before["loss"]


def test_secagg_config_refuses_what_it_cannot_run():
    from shared.errors import ConfigError
    from tests.conftest import tiny_config

    raw = tiny_config().model_dump(mode="json")
    for fed, priv, msg in (({"strategy": "fedadam"}, {}, "fedavg, upload fp32"),
                           ({"upload": "int8"}, {}, "fedavg, upload fp32"),
                           ({}, {"dp_sgd": {"noise_multiplier": 1.0}}, "cannot be combined")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({**raw, "federation": fed, "privacy": {"secagg": {}, **priv}})
