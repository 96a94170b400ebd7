"""Client-level (central) DP: config refusals, Flower's wrapper with its RdpAccountant around the
product's FedAvg (clipping, noise, equal weights, budget), and client-side clipping."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.app import app as client_app
from server.central_dp import wrap_central_dp
from server.strategy import make_strategy
from shared.config import config_from_dict
from shared.errors import ConfigError
from shared.fedio import build_global_model, model_arrays
from tests.conftest import tiny_config
from tests.test_federation import _reply, _task_identity, _train_message

__all__ = ["_task_identity"]

FED = {"fraction_train": 1.0, "min_train_clinics": 2, "min_available_clinics": 2,
       "local_epochs": 1}


def _cfg(central: dict, **fed):
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["freeze"] = 5
    raw["federation"] = {**FED, **fed}
    raw["privacy"] = {"central": central}
    return config_from_dict(raw)


def test_config_refuses_what_cannot_be_accounted():
    ok = {"noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="needs plain FedAvg aggregation"):
        _cfg(ok, strategy="fedadam")
    with pytest.raises(ConfigError, match="same number of clinics every round"):
        _cfg(ok, fraction_train=0.5)
    with pytest.raises(ConfigError, match="same number of clinics every round"):
        _cfg(ok, min_available_clinics=3)
    with pytest.raises(ConfigError, match="adaptive cannot be accounted"):
        _cfg({**ok, "clipping": "server-adaptive"})
    with pytest.raises(ConfigError, match="needs federation.upload fp32"):
        _cfg({**ok, "clipping": "client-fixed"}, upload="int8")
    for clipping in ("server-fixed", "client-fixed"):
        for strategy in ("fedavg", "fedprox"):  # Flower's accounted wrapper accepts both
            cfg = _cfg({**ok, "clipping": clipping}, strategy=strategy)
            assert wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central,
                                   cfg.federation)[1].accountant is not None
    adaptive = {**ok, "clipping": "server-adaptive", "accounting": False}
    cfg = _cfg(adaptive)
    with pytest.raises(ConfigError, match="privacy.central: .*clipped_count_stddev"):
        wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central, cfg.federation)
    cfg = _cfg({**adaptive, "clipped_count_stddev": 1.0})
    _, ledger = wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central,
                                cfg.federation)
    assert ledger.accountant is None and not ledger.summary()["accounted"]


class _Nodes:
    def get_node_ids(self):
        return [1, 2]


def test_server_side_clipping_noise_accounting_and_budget():
    cfg = _cfg({"noise_multiplier": 1.0, "clipping_norm": 0.5, "max_epsilon": 12.0})
    strategy, ledger = wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central,
                                       cfg.federation)
    start = {"w": np.zeros(4000, np.float32)}
    eps = []
    for rnd in range(1, 20):
        try:
            strategy.configure_train(rnd, ArrayRecord({"w": Array(start["w"])}), ConfigRecord(),
                                     _Nodes())
        except PrivacyBudgetExhausted as e:
            assert "max_epsilon" in str(e)
            break
        # far-apart updates: clipped to 0.5 each, they average to 0; what is left is the noise
        a = _reply(1, {"w": np.full(4000, 10.0, np.float32)}, 1)
        b = _reply(2, {"w": np.full(4000, -10.0, np.float32)}, 1)
        arrays, _ = strategy.aggregate_train(rnd, [a, b])
        w = arrays["w"].numpy()
        assert abs(w.mean()) < 0.05 and w.std() == pytest.approx(1.0 * 0.5 / 2, rel=0.1)
        eps.append(ledger.epsilon[rnd])
    else:
        pytest.fail("max_epsilon never stopped the rounds")
    assert len(eps) >= 2 and all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] <= 12.0
    # the accountant state survives a checkpoint round trip
    _, restored = wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central,
                                  cfg.federation)
    restored.load_state_dict(ledger.state_dict())
    assert restored.accountant.get_privacy_spent().epsilon == pytest.approx(eps[-1])
    assert restored.epsilon == ledger.epsilon
    fresh, _ = wrap_central_dp(make_strategy(cfg.federation), cfg.privacy.central,
                               cfg.federation)
    # unequal weights cannot be accounted: Flower refuses
    fresh.configure_train(1, ArrayRecord({"w": Array(start["w"])}), ConfigRecord(), _Nodes())
    with pytest.raises(ValueError, match="equal client weights"):
        fresh.aggregate_train(1, [_reply(1, start, 1), _reply(2, start, 3)])


def test_client_side_clipping_and_equal_weight_at_the_clinic(tiny_manifest):
    cfg = _cfg({"noise_multiplier": 1.0, "clipping_norm": 0.01, "clipping": "client-fixed"})
    start = model_arrays(build_global_model(cfg))
    msg = _train_message(cfg, start, **{KEY_CLIPPING_NORM: 0.01})
    ctx = Context(run_id=1, node_id=1, node_config={"manifest": str(tiny_manifest)},
                  state=RecordDict(), run_config={})
    reply = client_app(msg, ctx)
    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"]
    norm = np.sqrt(sum(float(np.sum((arrays[k].numpy() - start[k].numpy()) ** 2))
                       for k in arrays))
    assert 0 < norm <= 0.01 + 1e-6
    assert reply.content["metrics"]["num-examples"] == 1
