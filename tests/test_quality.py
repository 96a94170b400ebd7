"""Federated-quality methods (issue 13): client optimisers and their persistent state, the
learning-rate schedule across rounds, GroupNorm models, SCAFFOLD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from torch import nn

from client.app import app as client_app
from client.clinic import OPTIMIZER_KEY, SCAFFOLD_CI_KEY
from server.strategy import Scaffold, make_strategy, update_control
from shared.config import config_from_dict
from shared.fedio import (
    SCAFFOLD_C_KEY,
    SCAFFOLD_DELTA_KEY,
    build_global_model,
    config_record,
    exchanged_keys,
    model_arrays,
    round_lr,
)
from shared.models import build_model
from shared.training import (
    load_optimizer_state,
    make_optimizer,
    optimizer_state_arrays,
    optimizer_state_tensors,
)
from tests.conftest import tiny_config
from tests.test_federation import _task_identity

__all__ = ["_task_identity"]  # the autouse fixture: messages need a run/node identity


def _cfg(train: dict | None = None, **fed):
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["freeze"] = 3
    raw["train"].update(train or {})
    raw["federation"] = {"local_epochs": 1, **fed}
    return config_from_dict(raw)


def _msg(cfg, arrays: ArrayRecord, rnd: int = 1, kind: str = "train", **records) -> Message:
    conf = config_record(cfg)
    conf["server-round"] = rnd
    return Message(RecordDict({"arrays": arrays, "config": conf, **records}), dst_node_id=1,
                   message_type=kind)


def _ctx(manifest) -> Context:
    return Context(run_id=1, node_id=1, node_config={"manifest": str(manifest)},
                   state=RecordDict(), run_config={})


def test_sgd_optimizer_and_state_round_trip():
    model = nn.Linear(3, 2)
    cfg = tiny_config(optimizer="sgd", lr=0.1, momentum=0.9).train
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    saved = optimizer_state_arrays(opt)
    assert set(saved) == {"0.momentum_buffer", "1.momentum_buffer"}
    fresh = make_optimizer(model, cfg, lr=0.05)
    load_optimizer_state(fresh, saved)
    assert fresh.param_groups[0]["lr"] == 0.05  # this round's lr, not the saved one
    assert torch.equal(fresh.state[model.weight]["momentum_buffer"],
                       opt.state[model.weight]["momentum_buffer"])


def test_adamw_state_as_tensors_resumes_exactly_without_copies(tmp_path):
    """The optimiser's moments go to the clinic's state file as the optimiser's own tensors
    and come back into the next round's optimiser as the tensors read (client/clinic.py:
    no ArrayRecord copies); training then continues exactly as the arrays path does."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    cfg = tiny_config(optimizer="adamw", lr=0.1).train
    opt = make_optimizer(model, cfg)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    tensors = optimizer_state_tensors(opt)
    assert set(tensors) == set(optimizer_state_arrays(opt))
    assert tensors["0.exp_avg"].data_ptr() == opt.state[model.weight]["exp_avg"].data_ptr()
    torch.save(tensors, tmp_path / "state.pt")
    read = torch.load(tmp_path / "state.pt", weights_only=True)
    via_tensors = make_optimizer(model, cfg)
    load_optimizer_state(via_tensors, read)
    assert via_tensors.state[model.weight]["exp_avg"].data_ptr() == read["0.exp_avg"].data_ptr()
    via_arrays = make_optimizer(model, cfg)
    load_optimizer_state(via_arrays, optimizer_state_arrays(opt))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    after = []
    for o in (via_tensors, via_arrays):
        model.load_state_dict(start)
        model.zero_grad()
        model(torch.full((4, 3), 2.0)).sum().backward()
        o.step()
        after.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(after[0][k], after[1][k]) for k in start)
    assert not torch.equal(after[0]["weight"], start["weight"])


def test_round_lr_warmup_and_cosine():
    cfg = _cfg({"lr": 0.1}, rounds=6, warmup_rounds=1, lr_schedule="cosine")
    lrs = [round_lr(cfg, r) for r in range(1, 7)]
    assert lrs[0] == pytest.approx(0.05)  # warm-up: round 1 of 1 -> lr/2
    assert lrs[1] == pytest.approx(0.1)  # cosine starts at the full rate
    assert lrs[2] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert all(b < a for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0
    assert round_lr(_cfg({"lr": 0.1}), 4) == 0.1  # constant by default


def test_group_norm_model_has_no_batchnorm_or_running_statistics():
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["norm"] = "group"
    cfg = config_from_dict(raw)
    model = build_model(cfg.model, 2, 32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in model.modules())
    assert not any("running_" in k for k in exchanged_keys(model))
    # frozen stages keep their BatchNorm (fixed statistics in eval mode)
    raw["model"]["freeze"] = 2
    frozen = build_model(config_from_dict(raw).model, 2, 32)
    assert isinstance(frozen.bn1, nn.BatchNorm2d) and isinstance(frozen.layer2[0].bn1,
                                                                  nn.GroupNorm)
    out = frozen(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2)


def test_scaffold_server_update_is_the_mean_delta_over_all_clinics():
    """c <- c + (1/N) sum_i delta c_i, with N the connected clinics (2 of 4 replied)."""
    d1 = {"w": np.array([1.0, 2.0], np.float32)}
    d2 = {"w": np.array([3.0, -2.0], np.float32)}
    c = update_control(None, [d1, d2], 4)
    assert np.allclose(c["w"], [1.0, 0.0])  # (1+3)/4, (2-2)/4
    c = update_control(c, [d1], 4)
    assert np.allclose(c["w"], [1.25, 0.5])


def test_scaffold_clinic_corrects_gradients_and_updates_its_variate(tiny_manifest):
    """One local step of plain SGD (no momentum, no weight decay) at lr 0.1. SCAFFOLD's
    option II gives c_i+ = c_i - c + (x - y)/(K lr); with c_i = 0 (round 1) the reply's
    delta c_i must equal (x - y)/lr - c, and y = x - lr * (g + c) for the batch gradient g:
    so delta c_i = g whatever c is, which the second clinic (other c) must reproduce."""
    cfg = _cfg({"optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "weight_decay": 0.0},
               strategy="scaffold", local_steps=1)
    start = model_arrays(build_global_model(cfg))
    names = [n for n, p in build_global_model(cfg).named_parameters() if p.requires_grad]
    deltas, moved = [], []
    for scale in (0.0, 0.5):
        control = ArrayRecord({n: Array(np.full(start[n].shape, scale, np.float32))
                               for n in names})
        ctx = _ctx(tiny_manifest)
        reply = client_app(_msg(cfg, start, **{SCAFFOLD_C_KEY: control}), ctx)
        assert not reply.has_error(), reply.error
        delta = {k: a.numpy() for k, a in reply.content[SCAFFOLD_DELTA_KEY].items()}
        y = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        assert set(delta) == set(names)
        for n in names:
            expect = (start[n].numpy() - y[n]) / 0.1 - scale
            assert np.allclose(delta[n], expect, atol=1e-4), n
        kept = ctx.state[SCAFFOLD_CI_KEY]  # c_i+ = 0 + delta, kept at the clinic
        assert all(np.allclose(kept[n].numpy(), delta[n]) for n in names)
        deltas.append(delta)
        moved.append(y)
    for n in names:  # delta c_i = g: the same batch gradient, whatever c was
        assert np.allclose(deltas[0][n], deltas[1][n], atol=1e-3), n
    # the correction changed the step: y = x - lr (g + c)
    n = names[-1]
    assert np.allclose(moved[0][n] - moved[1][n], 0.1 * 0.5, atol=1e-5)


def test_scaffold_strategy_sends_c_and_learns_it_from_replies():
    cfg = _cfg(strategy="scaffold", min_train_clinics=2, min_available_clinics=2)
    strategy = make_strategy(cfg.federation)
    assert isinstance(strategy, Scaffold)

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    msgs = list(strategy.configure_train(1, arrays, config_record(cfg), Grid()))
    assert len(msgs) == 2 and SCAFFOLD_C_KEY not in msgs[0].content.array_records
    from tests.test_federation import _reply

    replies = []
    for node, (w, dc) in enumerate([([2.0, 2.0], [1.0, 0.0]), ([4.0, 4.0], [3.0, 2.0])], 1):
        r = _reply(node, {"w": np.array(w, np.float32)}, 1)
        r.content[SCAFFOLD_DELTA_KEY] = ArrayRecord({"w": Array(np.array(dc, np.float32))})
        replies.append(r)
    new, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(new["w"].numpy(), [3.0, 3.0])
    assert np.allclose(strategy.control["w"], [2.0, 1.0])
    msgs = list(strategy.configure_train(2, new, config_record(cfg), Grid()))
    assert np.allclose(msgs[1].content[SCAFFOLD_C_KEY]["w"].numpy(), [2.0, 1.0])


def test_clinic_keeps_its_optimizer_state_across_rounds_and_never_sends_it(tiny_manifest):
    cfg = _cfg({"optimizer": "sgd", "lr": 0.05}, keep_optimizer_state=True, local_steps=2)
    start = model_arrays(build_global_model(cfg))
    ctx = _ctx(tiny_manifest)
    r1 = client_app(_msg(cfg, start, 1), ctx)
    assert not r1.has_error(), r1.error
    first = {k: a.numpy().copy() for k, a in ctx.state[OPTIMIZER_KEY].items()}
    assert first and all(k.endswith("momentum_buffer") for k in first)
    r2 = client_app(_msg(cfg, r1.content["arrays"], 2), ctx)
    assert not r2.has_error(), r2.error
    second = {k: a.numpy() for k, a in ctx.state[OPTIMIZER_KEY].items()}
    assert any(not np.allclose(first[k], second[k]) for k in first)
    for reply in (r1, r2):  # only the model and scalars leave the clinic
        assert set(reply.content.array_records) == {"arrays"}
        assert set(reply.content["arrays"]) == set(start)
    # continuing from the kept momentum differs from a fresh optimiser
    fresh = client_app(_msg(cfg, r1.content["arrays"], 2), _ctx(tiny_manifest))
    diff = max(float(np.abs(fresh.content["arrays"][k].numpy()
                            - r2.content["arrays"][k].numpy()).max()) for k in start)
    assert diff > 0


class _CrashingGrid:
    """An in-process grid whose `crash_at`-th training exchange dies (the coordinator's
    process is killed mid-round)."""

    def __init__(self, grid, crash_at: int):
        self.grid, self.crash_at, self.trains = grid, crash_at, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.trains += 1
            if self.trains == self.crash_at:
                raise KeyboardInterrupt("coordinator killed")
        return self.grid.send_and_receive(messages, timeout=timeout)


def _straight_and_resumed(tmp_path, fed: dict, train: dict | None = None, n: int = 64,
                          after_crash=None):
    """The real server loop and ClientApp in process, 2 clinics, 3 rounds: straight, and on a
    copy of the split crashed in round 3 then resumed by a new Flower run (clinics'
    context.state empty). `after_crash(run_dir, split_dir)` checks what the crash left."""
    import shutil

    from server.federation import run_federation
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split
    from tests.conftest import write_tiny_multilabel

    manifest = write_tiny_multilabel(tmp_path / "data", n=n)
    raw = _cfg(train, rounds=3, local_steps=2, **fed).model_dump(mode="json")
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    cfg = config_from_dict(raw)
    prepare_split(cfg, manifest, tmp_path / "split_a")
    shutil.copytree(tmp_path / "split_a", tmp_path / "split_b")

    def run(split: str, grid, resume: bool = False):
        return run_federation(grid, cfg, tmp_path / split / "server_test.csv",
                              run_dir=tmp_path / f"run_{split}", resume=resume)

    straight = run("split_a", InProcessGrid(tmp_path / "split_a", 2))
    with pytest.raises(KeyboardInterrupt):
        run("split_b", _CrashingGrid(InProcessGrid(tmp_path / "split_b", 2), crash_at=3))
    if after_crash is not None:
        after_crash(tmp_path / "run_split_b", tmp_path / "split_b")
    resumed = run("split_b", InProcessGrid(tmp_path / "split_b", 2, resume=True),
                  resume=True)
    return straight, resumed


def test_resume_is_exact_with_scaffold_and_kept_client_optimizer_state(tmp_path):
    """3 rounds straight, versus 2 rounds, a crash in round 3 and a resume. The server's
    SCAFFOLD variate comes from the checkpoint, each clinic's variate and momentum from its
    own state folder: the final models must be identical."""
    def after_crash(run_dir, split_dir):
        assert (split_dir / "clinic_0" / "state" / "after_round_2.pt").is_file()

    straight, resumed = _straight_and_resumed(
        tmp_path, {"strategy": "scaffold", "keep_optimizer_state": True},
        {"optimizer": "sgd", "lr": 0.05}, after_crash=after_crash)
    a, b = straight.evaluator.final_state, resumed.evaluator.final_state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert straight.evaluator.history[3] == resumed.evaluator.history[3]


def test_resume_while_a_round_waits_for_its_batchnorm_statistics_is_exact(tmp_path):
    """bn_recalibration without clinic evaluation: round 2's statistics come with round 3's
    train replies. A coordinator killed in round 3 has checkpointed round 2 unscored; the
    resumed run asks round 3's clinics for them and scores round 2 as the straight run did."""
    from server.checkpoint import load_checkpoint

    def after_crash(run_dir, split_dir):
        waiting = json.loads(load_checkpoint(run_dir)["evaluator"]["history"])
        assert sorted(waiting) == ["0"]  # round 2 checkpointed, not yet scored

    straight, resumed = _straight_and_resumed(
        tmp_path, {"bn_recalibration": True, "evaluate_every": 2, "fraction_evaluate": 0.0},
        n=48, after_crash=after_crash)
    assert sorted(resumed.evaluator.history) == [0, 2, 3]
    for rnd in (2, 3):
        assert straight.evaluator.history[rnd] == resumed.evaluator.history[rnd]


def test_a_second_federation_over_the_same_split_starts_clean(tmp_path):
    """Benchmarks run variants and seeds over one split folder. The second run must equal
    the first: the first's saved clinic state (after rounds 3-5) once pushed the second's
    own round-1 file out of the 3 kept, and rounds 2-5 restarted AdamW from scratch."""
    from server.federation import run_federation
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split
    from tests.conftest import write_tiny_multilabel

    manifest = write_tiny_multilabel(tmp_path / "data", n=48)
    raw = _cfg(rounds=5, local_steps=1, keep_optimizer_state=True).model_dump(mode="json")
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    cfg = config_from_dict(raw)
    split = tmp_path / "split"
    prepare_split(cfg, manifest, split)
    runs = [run_federation(InProcessGrid(split, 2, threads=1), cfg, split / "server_test.csv")
            for _ in range(2)]
    a, b = (r.evaluator.final_state for r in runs)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    kept = sorted(p.name for p in (split / "clinic_0" / "state").glob("after_round_*.pt"))
    assert kept == ["after_round_3.pt", "after_round_4.pt", "after_round_5.pt"]


def test_saving_a_round_drops_state_files_from_later_rounds(tmp_path):
    """A file after a later round belongs to another timeline (an earlier run over the same
    folder, a replaced attempt): after round t is saved, only rounds <= t remain."""
    from client.clinic import STATE_ROUND_KEY, restore_round_state, save_round_state

    split = tmp_path / "split"
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"split-dir": str(split)})
    state = split / "clinic_0" / "state"
    state.mkdir(parents=True)
    for r in (6, 7, 8):  # an earlier, longer run's files
        torch.save({OPTIMIZER_KEY: {"w": torch.full((2,), float(r))}},
                   state / f"after_round_{r}.pt")
    ctx.state[OPTIMIZER_KEY] = ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))})
    save_round_state(ctx, 1)
    assert sorted(p.name for p in state.glob("after_round_*.pt")) == ["after_round_1.pt"]
    fresh = Context(run_id=2, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                    run_config={"split-dir": str(split)})
    restore_round_state(fresh, 2)
    assert fresh.state.config_records[STATE_ROUND_KEY]["round"] == 1
    assert float(fresh.state[OPTIMIZER_KEY]["w"].numpy()[0]) == 1.0


def test_fedbn_replies_carry_no_batchnorm_and_the_clinic_keeps_its_own(tiny_manifest):
    import client.clinic as clinic_mod
    from client.clinic import LOCAL_BN_KEY

    cfg = _cfg(local_bn=True, local_steps=2)
    model = build_global_model(cfg)
    bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    start = model_arrays(model)
    assert start and not any(k.rsplit(".", 1)[0] in bn for k in start)
    ctx = _ctx(tiny_manifest)
    r1 = client_app(_msg(cfg, start, 1), ctx)
    assert not r1.has_error(), r1.error
    assert set(r1.content["arrays"]) == set(start)  # no BatchNorm key leaves the clinic
    own = {k: a.numpy().copy() for k, a in ctx.state[LOCAL_BN_KEY].items()}
    assert any(k.endswith("layer4.1.bn2.running_mean") for k in own)
    assert not np.allclose(own["layer4.1.bn2.running_mean"], 0)  # trained, not initial
    clinic_mod._CLINICS.clear()  # a new ClientApp process: only context.state survives
    ev = client_app(_msg(cfg, r1.content["arrays"], 1, kind="evaluate"), ctx)
    assert not ev.has_error(), ev.error
    (clinic,) = clinic_mod._CLINICS.values()
    state = clinic.model.state_dict()
    for k, v in own.items():
        assert np.array_equal(state[k].numpy(), v), k
    r2 = client_app(_msg(cfg, r1.content["arrays"], 2), ctx)
    assert not r2.has_error(), r2.error
    # round 2 started from the kept BatchNorm: its statistics moved on from round 1's
    later = ctx.state[LOCAL_BN_KEY]["layer4.1.bn2.num_batches_tracked"].numpy()
    assert int(later) == int(own["layer4.1.bn2.num_batches_tracked"]) + 2


def test_mixture_statistics_are_those_of_the_union():
    from shared.fedio import mixture_statistics

    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (300, 3)), rng.normal(-2.0, 0.5, (100, 3))
    stats = [{"bn.running_mean": x.mean(0), "bn.running_var": x.var(0)} for x in (a, b)]
    out = mixture_statistics(stats, [300, 100])
    both = np.concatenate([a, b])
    assert np.allclose(out["bn.running_mean"], both.mean(0), atol=1e-5)
    assert np.allclose(out["bn.running_var"], both.var(0), atol=1e-4)
    # the plain average of the variances misses the spread between the clinics' means
    assert np.all(out["bn.running_var"] > 0.75 * a.var(0) + 0.25 * b.var(0) + 1.0)


def test_bn_recalibration_clinic_sends_statistics_of_the_global_model(tiny_manifest):
    cfg = _cfg(bn_recalibration=True)
    model = build_global_model(cfg)
    start = model_arrays(model)
    reply = client_app(_msg(cfg, start, 1, kind="evaluate"), _ctx(tiny_manifest))
    assert not reply.has_error(), reply.error
    from shared.fedio import BN_EXAMPLES_KEY, BN_STATS_KEY

    stats = reply.content[BN_STATS_KEY]
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
          and not n.startswith(("bn1", "layer1", "layer2"))]  # freeze 3: trainable BN only
    assert set(stats) == {f"{n}.{s}" for n in bn for s in ("running_mean", "running_var")}
    assert reply.content["metrics"][BN_EXAMPLES_KEY] > 0
    # recomputed for this model, not the initial (0, 1) statistics that were sent
    assert not np.allclose(stats["layer4.1.bn2.running_var"].numpy(), 1.0)
    # bn_recalibration_images caps the pass at a sample of the clinic's training images
    capped = client_app(_msg(_cfg(bn_recalibration=True, bn_recalibration_images=5), start, 1,
                             kind="evaluate"), _ctx(tiny_manifest))
    assert not capped.has_error(), capped.error
    assert capped.content["metrics"][BN_EXAMPLES_KEY] == 5 < reply.content["metrics"][
        BN_EXAMPLES_KEY]


def test_clinic_batch_size_is_its_own(tiny_manifest):
    """federation.batch_size sets the clinics' local batch (FedAvg's B): a 2-step round then
    sees 2 x 4 images, not 2 x data.batch_size; pooled training keeps data.batch_size."""
    for fed_batch, expect in ((None, 2 * tiny_config().data.batch_size), (4, 8)):
        cfg = _cfg(local_steps=2, batch_size=fed_batch)
        reply = client_app(_msg(cfg, model_arrays(build_global_model(cfg))),
                           _ctx(tiny_manifest))
        assert not reply.has_error(), reply.error
        (metrics,) = reply.content.metric_records.values()
        assert metrics["examples_seen"] == expect


@pytest.mark.slow
def test_evaluate_every_and_no_clinic_evaluation_leave_training_unchanged(tmp_path):
    """federation.evaluate_every 2 scores rounds 0, 2 and the last (3) on the server's test set
    and has the clinics evaluate (and re-estimate BatchNorm statistics) in rounds 2 and 3 only;
    fraction_evaluate 0 sends no evaluate message to any clinic. Neither changes training: the
    evaluated models are bit for bit those of a run that evaluates everything, and the run
    folder still lists every round."""
    from server.federation import run_federation
    from server.run_folder import write_run_folder
    from shared.fedio import BN_EXAMPLES_KEY, BN_STATS_ONLY_KEY, BN_STATS_ROUND_KEY
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split
    from tests.conftest import write_tiny_multilabel

    manifest = write_tiny_multilabel(tmp_path / "data", n=60)

    def run(name: str, **fed):
        raw = _cfg(rounds=3, local_steps=2, **fed).model_dump(mode="json")
        # 3 clinics: with 2, a weighted sum is the same in either order, and a reply order
        # that depended on timings (it once did) would go unseen
        raw["split"] = {"clinics": 3, "scheme": "iid", "test_fraction": 0.25}
        cfg = config_from_dict(raw)
        prepare_split(cfg, manifest, tmp_path / name)
        grid = InProcessGrid(tmp_path / name, 3)
        return run_federation(grid, cfg, tmp_path / name / "server_test.csv"), grid

    def evaluate_rounds(grid) -> list[int]:
        return sorted({int(m.content["config"]["server-round"]) for m in grid.sent
                       if m.metadata.message_type.startswith("evaluate")
                       and "config" in m.content.config_records})

    # BatchNorm re-estimation every round, versus only in the evaluated rounds 2 and 3 (the
    # clinics evaluate when the server does): the same evaluated models, bit for bit.
    full, full_grid = run("full", bn_recalibration=True)
    every2, every2_grid = run("every2", bn_recalibration=True, evaluate_every=2)
    lean, lean_grid = run("lean", evaluate_every=2, fraction_evaluate=0.0)
    assert sorted(full.evaluator.history) == [0, 1, 2, 3]
    assert sorted(every2.evaluator.history) == sorted(lean.evaluator.history) == [0, 2, 3]
    assert evaluate_rounds(full_grid) == [1, 2, 3] and evaluate_rounds(every2_grid) == [2, 3]
    kinds = [m.metadata.message_type for m in lean_grid.sent]
    assert not [k for k in kinds if k.startswith("evaluate")] and "train" in kinds
    a, b = full.evaluator.final_state, every2.evaluator.final_state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    for rnd in (2, 3):
        assert full.evaluator.history[rnd] == every2.evaluator.history[rnd]
    # Without any clinic evaluation the trained weights are still the same (only the
    # BatchNorm running statistics, which nobody re-estimated, differ).
    c = lean.evaluator.final_state
    weights = [k for k in a if not k.endswith(("running_mean", "running_var"))]
    assert max(float((a[k] - c[k]).abs().max()) for k in weights) == 0.0
    data = write_run_folder(lean, tmp_path / "run_lean")
    assert [h["round"] for h in data["history"]] == [0, 1, 2, 3]
    assert data["history"][1]["server"] is None and data["history"][1]["clinics_train"]

    # BatchNorm re-estimation without clinic evaluation: round 2's statistics ride on round
    # 3's train replies, round 3's come from an evaluate message that asks for them alone.
    # One exchange fewer, and the same evaluated models as every2's, bit for bit.
    piggy, piggy_grid = run("piggy", bn_recalibration=True, evaluate_every=2,
                            fraction_evaluate=0.0)
    assert sorted(piggy.evaluator.history) == [0, 2, 3]
    for rnd in (0, 2, 3):
        assert piggy.evaluator.history[rnd] == every2.evaluator.history[rnd]
    c = piggy.evaluator.final_state
    assert max(float((b[k] - c[k]).abs().max()) for k in b) == 0.0
    asked = [(m.metadata.message_type.split(".")[0], int(m.content["config"]["server-round"]),
              m.content["config"].get(BN_STATS_ROUND_KEY),
              m.content["config"].get(BN_STATS_ONLY_KEY)) for m in piggy_grid.sent
             if "config" in m.content.config_records]
    assert sorted(set(asked)) == [("evaluate", 3, None, True), ("train", 1, None, None),
                                  ("train", 2, None, None), ("train", 3, 2, None)]
    def messages(grid) -> int:
        return sum("config" in m.content.config_records for m in grid.sent)

    assert messages(piggy_grid) == messages(every2_grid) - 3  # round 2's evaluate messages
    assert not any(BN_EXAMPLES_KEY in v for v in piggy.train_aggregated.values())


@pytest.mark.slow
def test_every_strategy_trains_with_int8_uploads(tmp_path):
    """Each strategy with int8 uploads (decoded at the server from per-tensor scales), 2 rounds
    of the real server loop and ClientApp in process (3 clinics): the run trains both rounds
    to a finite model. FedAvgM with int8 crashed in round 1 until decoded updates came in the
    global model's array order. (fp16 changes decode the same way: tests/test_upload.py.)"""
    upload = "int8"
    import math

    from server.federation import run_federation
    from shared.config import STRATEGIES
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split
    from tests.conftest import write_tiny_multilabel

    manifest = write_tiny_multilabel(tmp_path / "data", n=72)
    for strategy in STRATEGIES:
        raw = _cfg(rounds=2, local_steps=1, strategy=strategy, upload=upload,
                   min_train_clinics=3, min_available_clinics=3).model_dump(mode="json")
        raw["split"] = {"clinics": 3, "scheme": "iid", "test_fraction": 0.25}
        cfg = config_from_dict(raw)
        split = tmp_path / f"split_{strategy}"
        prepare_split(cfg, manifest, split)
        res = run_federation(InProcessGrid(split, 3), cfg, split / "server_test.csv")
        assert res.stopped is None, (strategy, res.stopped)
        for rnd in (1, 2):
            rec = res.recorder.rounds[rnd]
            assert rec.skipped is None and rec.replied == 3, (strategy, upload, rec)
            assert not rec.rejected and not rec.errors and not rec.train_failed, rec
        final = res.evaluator.history[2]
        assert math.isfinite(final["loss"]), (strategy, upload, final)
