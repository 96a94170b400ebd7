"""Sample-level DP-SGD (Opacus) for the one training loop, and the privacy account that a
clinic keeps across rounds.

Opacus' RDP accountant is a list of (noise_multiplier, sample_rate, steps) entries; epsilon is a
function of that list and delta. `DpAccount` holds the list as plain numbers so that a clinic can
keep it in Flower's persistent `context.state` and in its ledger on disk (client/clinic.py): the
epsilon a clinic reports is composed over every round it trained in, not reset per round nor by a
resumed federation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torchvision.models import ResNet

from shared.config import DpSgdConfig
from shared.errors import DentfedError
from shared.models import set_train_mode


class PrivacyBudgetSpent(DentfedError):
    """Training once more would take the privacy loss past `max_epsilon` (or the clinic
    cannot tell what it has spent). `epsilon`: what it has spent, when known."""

    def __init__(self, detail: str, epsilon: float | None = None) -> None:
        super().__init__(detail)
        self.epsilon = epsilon


# A clinic that declines to train on its privacy budget replies (without an error) with this
# config record, {DECLINED_BUDGET: True, "detail": numbers-only text, "epsilon": spent (when
# known)}, and no arrays; the coordinator counts the decline by the record, never by parsing
# text.
DECLINED_RECORD = "declined"
DECLINED_BUDGET = "declined-budget"
DECLINED_EPSILON = "epsilon"


def declined_reply(msg: Message, detail: str, epsilon: float | None = None) -> Message:
    """The clinic's structured reply to a train message it declines (budget spent)."""
    rec = ConfigRecord({DECLINED_BUDGET: True, "detail": detail})
    if epsilon is not None:
        rec[DECLINED_EPSILON] = float(epsilon)
    return Message(RecordDict({DECLINED_RECORD: rec}), reply_to=msg)


def declined_reason(reply: Message) -> str | None:
    """The clinic's one-line budget note from a declined reply; None for any other reply."""
    if reply.has_error():
        return None
    rec = reply.content.config_records.get(DECLINED_RECORD)
    if rec is None or rec.get(DECLINED_BUDGET) is not True:
        return None
    return str(rec.get("detail", "privacy budget spent"))


def declined_epsilon(reply: Message) -> float | None:
    """The epsilon a declining clinic says it has spent (None: not a decline, or unknown).
    After a resume it can be more than the clinic's last reported epsilon: its ledger keeps
    updates it released in a round the coordinator's checkpoint did not reach."""
    if declined_reason(reply) is None:
        return None
    value = reply.content.config_records[DECLINED_RECORD].get(DECLINED_EPSILON)
    return float(value) if isinstance(value, int | float) else None


@dataclass
class DpAccount:
    """Composed (noise_multiplier, sample_rate, steps) history of one data holder."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        """Epsilon at `delta` over the whole history (RDP accountant); 0 before any step."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = list(self.history)
        return float(acc.get_epsilon(delta))

    def plus(self, noise_multiplier: float, sample_rate: float, steps: int) -> DpAccount:
        return DpAccount([*self.history, (float(noise_multiplier), float(sample_rate),
                                          int(steps))])

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def state_dict(self) -> dict[str, list]:
        return {"noise_multiplier": [h[0] for h in self.history],
                "sample_rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> DpAccount:
        rows = zip(state.get("noise_multiplier", []), state.get("sample_rate", []),
                   state.get("steps", []), strict=True)
        return cls([(float(n), float(q), int(s)) for n, q, s in rows])

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.state_dict())

    @classmethod
    def from_record(cls, record: ConfigRecord | None) -> DpAccount:
        return cls() if record is None else cls.from_state_dict(dict(record))


def noise_for(dp: DpSgdConfig, sample_rate: float, total_steps: int) -> float:
    """The configured noise multiplier, or the one that spends exactly target_epsilon (at delta)
    over total_steps steps at sample_rate."""
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                      sample_rate=sample_rate, steps=max(total_steps, 1),
                                      accountant="rdp"))


def grad_sample_mode(model: nn.Module, dp: DpSgdConfig) -> str:
    """Opacus' hooks (fast) wherever they work; "ew" (ExpandedWeights, ~35x slower on CPU) for
    torchvision ResNets, whose `out += identity` modifies a hooked view in place, which torch
    2.14 forbids. A ViT's class token and position embedding are plain parameters that "ew"
    cannot expand, and hooks handle them."""
    if dp.grad_sample_mode != "auto":
        return dp.grad_sample_mode
    return "ew" if isinstance(model, ResNet) else "hooks"


def sample_rate_of(loader: DataLoader) -> float:
    """Opacus' Poisson sampling rate for a loader: expected batch = batch_size."""
    return 1.0 / max(len(loader), 1)


def check_budget(account: DpAccount, dp: DpSgdConfig, noise_multiplier: float,
                 sample_rate: float, steps: int) -> float:
    """Epsilon after `steps` more steps; PrivacyBudgetSpent when that passes max_epsilon."""
    spent = account.epsilon(dp.delta)
    after = account.plus(noise_multiplier, sample_rate, steps).epsilon(dp.delta)
    if dp.max_epsilon is not None and after > dp.max_epsilon:
        raise PrivacyBudgetSpent(
            f"privacy budget: epsilon is {spent:.3f} and {steps} more DP-SGD steps would make "
            f"it {after:.3f}, above max_epsilon {dp.max_epsilon:g} (delta {dp.delta:g}); "
            "declining to train", epsilon=spent)
    return after


@dataclass
class PrivateTraining:
    """Opacus' wrapped module, optimiser and Poisson loader for one training call. Train the
    wrapped objects with `train_one_epoch`; read weights from the original model; `close()`
    removes Opacus' hooks and per-sample gradients from the original model afterwards."""

    module: nn.Module
    optimizer: Optimizer
    loader: DataLoader
    noise_multiplier: float
    sample_rate: float
    account: DpAccount
    _engine: object

    def current(self) -> DpAccount:
        """The account including every optimiser step taken so far."""
        return DpAccount([(float(n), float(q), int(s)) for n, q, s in
                          self._engine.accountant.history])  # type: ignore[attr-defined]

    def close(self) -> None:
        self.module._close()  # type: ignore[operator]


def make_private(model: nn.Module, optimizer: Optimizer, loader: DataLoader, dp: DpSgdConfig,
                 noise_multiplier: float, account: DpAccount | None = None
                 ) -> PrivateTraining:
    """Wrap model/optimizer/loader with Opacus: Poisson sampling (each sample is in a batch with
    probability batch_size/N, what the RDP analysis of the sampled Gaussian mechanism assumes),
    per-sample clipping to max_grad_norm, Gaussian noise. The accountant continues `account`."""
    from opacus import PrivacyEngine

    account = account or DpAccount()
    set_train_mode(model)  # Opacus refuses a model left in eval mode (e.g. by an evaluation)
    with warnings.catch_warnings():  # secure-RNG advice and the like; the choice is documented
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(account.history)
        module, opt, dl = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=grad_sample_mode(model, dp))
    return PrivateTraining(module, opt, dl, noise_multiplier, dl.sample_rate, account, engine)


def planned_steps(loader: DataLoader, epochs: int, max_steps: int | None) -> int:
    """Optimiser steps a training call will take: epochs of len(loader) batches, or max_steps."""
    per_epoch = len(loader)
    return max_steps if max_steps is not None else epochs * per_epoch
