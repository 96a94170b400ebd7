"""Client-level (central) differential privacy: Flower's strategy wrappers around the configured
FedAvg/FedProx, with Flower's RdpAccountant for fixed clipping.

One release per round: the clipped updates of the N sampled clinics are averaged with equal
weights and Gaussian noise of std noise_multiplier * clipping_norm / N is added. The accountant
(no amplification by sampling: every clinic is asked every round) composes the releases; its
`state_dict()`/`load_state_dict()` are Flower's own, for server checkpoints. `CentralDpLedger`
keeps the epsilon after each round for the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from shared.config import CentralDpConfig, FederationConfig
from shared.errors import ConfigError

log = logging.getLogger("dentfed.server")


@dataclass
class CentralDpLedger:
    """Epsilon spent after each round's release (at the configured delta)."""

    cfg: CentralDpConfig
    clinics: int
    accountant: RdpAccountant | None
    epsilon: dict[int, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """For a server checkpoint: the accountant's own state plus the per-round ledger."""
        return {"accountant": self.accountant.state_dict() if self.accountant else None,
                "epsilon": {str(k): v for k, v in self.epsilon.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.epsilon = {int(k): float(v) for k, v in state.get("epsilon", {}).items()}

    def summary(self) -> dict:
        return {"mechanism": f"client-level central DP, {self.cfg.clipping} clipping "
                             "(Flower), one Gaussian release per round",
                "clinics_per_round": self.clinics, "noise_multiplier": self.cfg.noise_multiplier,
                "clipping_norm": self.cfg.clipping_norm, "delta": self.cfg.delta,
                "max_epsilon": self.cfg.max_epsilon, "accounted": self.accountant is not None,
                "epsilon_per_round": {str(k): v for k, v in sorted(self.epsilon.items())},
                "epsilon": max(self.epsilon.values()) if self.epsilon else 0.0}


def wrap_central_dp(strategy: Strategy, c: CentralDpConfig, f: FederationConfig
                    ) -> tuple[Strategy, CentralDpLedger]:
    """The configured Flower DP wrapper around `strategy` (config validation has already
    refused what cannot be accounted) and the ledger that follows its accountant."""
    n = f.min_train_clinics
    accountant = None
    if c.accounting:
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=c.delta, population_size=f.min_available_clinics,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=c.max_epsilon))
    if c.clipping == "server-fixed":
        dp: Strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, c.noise_multiplier, c.clipping_norm, n, accountant=accountant)
    elif c.clipping == "client-fixed":
        dp = DifferentialPrivacyClientSideFixedClipping(
            strategy, c.noise_multiplier, c.clipping_norm, n, accountant=accountant)
    else:
        cls = (DifferentialPrivacyServerSideAdaptiveClipping if c.clipping == "server-adaptive"
               else DifferentialPrivacyClientSideAdaptiveClipping)
        try:
            dp = cls(strategy, c.noise_multiplier, n, initial_clipping_norm=c.clipping_norm,
                     target_clipped_quantile=c.target_clipped_quantile,
                     clip_norm_lr=c.clip_norm_lr, clipped_count_stddev=c.clipped_count_stddev)
        except ValueError as e:  # Flower's parameter checks, e.g. too few clinics for the noise
            raise ConfigError(f"privacy.central: {e}") from None
    ledger = CentralDpLedger(c, n, accountant)
    aggregate = dp.aggregate_train

    def aggregate_train(server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = aggregate(server_round, replies)
        if arrays is not None and accountant is not None and accountant.num_releases:
            ledger.epsilon[server_round] = float(accountant.get_privacy_spent().epsilon)
            log.info("round %d: client-level epsilon %.3f (delta %g) after %d releases",
                     server_round, ledger.epsilon[server_round], c.delta,
                     accountant.num_releases)
        return arrays, metrics

    dp.aggregate_train = aggregate_train  # type: ignore[method-assign]
    return dp, ledger
