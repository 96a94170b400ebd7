"""Self-supervised pretraining (issue 14): masking, the MAE and MDE losses, the encoder file into
the classifier, pooled and real federated pretraining runs, and `dentfed data check`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dentfed.cli import main as cli_main
from shared.config import config_from_dict, with_overrides
from shared.errors import DentfedError, WeightsError
from shared.fedio import build_global_model, exchanged_keys, model_arrays, pretrained_sha256
from shared.masked_modeling import MaskedImageModel, masked_count, patchify, random_masking
from shared.model_file import read_model_file
from shared.models import ENCODER_FILE, build_model, head_prefixes, sha256_of
from shared.training import make_optimizer
from tests.conftest import write_tiny_multilabel

VIT = {"name": "vit", "vit": {"size": "tiny", "patch_size": 8, "depth": 2}}


def _pretrain_cfg(method: str = "mae", **pre):
    return config_from_dict({
        "task": {"type": "pretrain"},
        "data": {"image_size": 32, "batch_size": 16},
        "model": VIT,
        "train": {"epochs": 2, "lr": 0.002, "progress": False},
        "pretrain": {"method": method, **pre},
    })


def _model(method: str = "mae", **pre) -> MaskedImageModel:
    torch.manual_seed(0)
    model = build_global_model(_pretrain_cfg(method, **pre))
    assert isinstance(model, MaskedImageModel)
    return model


def _unlabelled(root: Path, n: int = 48) -> Path:
    """The tiny set's images with path/patient_id/site only (no label column)."""
    labelled = write_tiny_multilabel(root, n=n)
    df = pd.read_csv(labelled)
    df[["path", "patient_id", "site"]].to_csv(root / "unlabelled.csv", index=False)
    return root / "unlabelled.csv"


@pytest.mark.parametrize("ratio,patches", [(0.25, 16), (0.75, 16), (0.25, 196), (0.6, 49),
                                           (0.01, 16), (0.99, 16)])
def test_masking_keeps_exactly_round_ratio_patches_masked(ratio, patches):
    mask, keep = random_masking(64, patches, ratio, torch.device("cpu"),
                                torch.Generator().manual_seed(1))
    want = min(max(round(ratio * patches), 1), patches - 1)
    assert masked_count(patches, ratio) == want
    assert (mask.sum(1) == want).all()
    assert keep.shape == (64, patches - want)
    assert not mask.gather(1, keep).any()  # the kept indices are exactly the unmasked ones
    assert len({tuple(r) for r in mask.int().tolist()}) > 1  # a different mask per image


def test_model_masks_round_ratio_of_its_patches():
    model = _model(mask_ratio=0.25)
    parts = model.forward_parts(torch.randn(5, 3, 32, 32))
    assert model.num_patches == 16
    assert (parts["mask"].sum(1) == 4).all()


def test_mae_loss_counts_masked_patches_only(monkeypatch):
    model = _model("mae").eval()
    x = torch.randn(4, 3, 32, 32)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731  same mask every call
    mask = model.forward_parts(x, gen())["mask"]
    target = patchify(x, 8)
    m = mask[..., None].float()
    noise = torch.randn_like(target) * 5

    def decoded(pred: torch.Tensor):
        monkeypatch.setattr(model.decoder, "forward", lambda *a, **k: pred)
        return float(model.forward_parts(x, gen())["loss"])

    # wrong everywhere except the masked patches: no loss; wrong on masked ones: loss
    assert decoded(target + noise * (1 - m)) == pytest.approx(0.0, abs=1e-10)
    wrong = decoded(target + noise * m)
    assert wrong == pytest.approx(float(((noise * m) ** 2).mean(-1).sum() / mask.sum()),
                                  rel=1e-5)
    assert wrong > 1.0


def test_mde_target_has_no_gradient_path_and_is_not_constant():
    model = _model("mde", ema_momentum=0.9).train()
    x = torch.randn(6, 3, 32, 32)
    target = model.targets(x)
    assert target.shape == (6, 16, 192)
    assert not target.requires_grad and target.grad_fn is None
    # not trivially constant: differs across patches and across images
    assert float(target.std(dim=1).mean()) > 0.1 and float(target.std(dim=0).mean()) > 0.1
    assert model.teacher is not None
    assert not any(k.startswith("teacher") for k in model.state_dict())  # never exchanged
    assert all(not p.requires_grad for p in model.teacher.parameters())
    opt = make_optimizer(model, _pretrain_cfg().train)
    loss = model(x)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.encoder.conv_proj.weight.grad is not None  # the student learns
    teacher_before = model.teacher.conv_proj.weight.detach().clone()
    opt.step()
    model(x)  # the next training forward moves the teacher by EMA towards the student
    moved = model.teacher.conv_proj.weight.detach()
    student = model.encoder.conv_proj.weight.detach()
    assert not torch.equal(moved, teacher_before)
    expected = 0.9 * teacher_before + 0.1 * student
    assert torch.allclose(moved, expected, atol=1e-6)
    # loading weights (the global model at a clinic) re-derives the teacher from them
    model.load_state_dict(model.state_dict())
    assert torch.equal(model.teacher.conv_proj.weight, model.encoder.conv_proj.weight)


def test_pooled_pretraining_encoder_initialises_the_classifier(tmp_path):
    """`dentfed train` of a pretrain task writes encoder.pt; a ViT classifier with
    model.pretrained = the run folder (or the file) uses every encoder key, its head new."""
    from simulations.pooled_training import run_training

    run = tmp_path / "pre"
    res = run_training(_pretrain_cfg("mae"), _unlabelled(tmp_path / "d"), run)
    hist = res["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for name in (ENCODER_FILE, "reconstructions.png", "model.pt", "report.md"):
        assert (run / name).is_file(), name
    assert "| epoch | train loss |" in (run / "report.md").read_text()
    with pytest.raises(DentfedError, match="pretraining run"):
        read_model_file(run)  # nothing to predict with
    enc = torch.load(run / ENCODER_FILE, weights_only=True)
    assert enc["kind"] == "encoder" and enc["labels"] == []
    state = enc["state_dict"]
    assert state and not any(k.startswith(("heads", "decoder", "teacher")) for k in state)

    sha = sha256_of(run / ENCODER_FILE)
    for pretrained in (run, run / ENCODER_FILE):
        cfg = config_from_dict({"task": {"type": "multiclass", "labels": ["a", "b", "c"],
                                         "label_column": "y"},
                                "data": {"image_size": 32},
                                "model": {**VIT, "pretrained": str(pretrained), "freeze": 2,
                                          "pretrained_sha256": sha[:12]}})
        assert pretrained_sha256(cfg) == sha  # what the coordinator and clinics compare
        torch.manual_seed(123)
        clf = build_model(cfg.model, 3, 32)
        own = clf.state_dict()
        head = head_prefixes(clf)
        body = [k for k in own if not k.startswith(head)]
        assert set(body) == set(state)  # every encoder key used, nothing left out
        for k in body:
            assert torch.equal(own[k], state[k]), k
        assert own["heads.1.weight"].shape == (3, 192)  # a new 3-class head
        assert not any(k.startswith("heads") for k in state)
        assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    bad = cfg.model.model_copy(update={"pretrained_sha256": "0" * 12})
    with pytest.raises(WeightsError, match="sha256"):
        build_model(bad, 3, 32)
        frozen = [n for n, p in clf.named_parameters() if not p.requires_grad]
        assert "conv_proj.weight" in frozen and "heads.1.weight" not in frozen


def test_pooled_pretraining_keeps_its_last_epoch(tmp_path):
    """A pretraining run trains every epoch and keeps the last (as a federated one keeps its
    final round): MDE's validation loss follows a moving teacher, so neither the best epoch
    nor early stopping is defined. A learning rate of ~0 leaves the validation loss flat, so
    best-epoch training with patience 1 would stop after epoch 2 and keep epoch 1."""
    from shared.data.dataset import make_loader
    from shared.data.manifest import read_manifest
    from shared.losses import make_loss
    from shared.training import fit
    from simulations.pooled_training import run_training

    cfg = with_overrides(_pretrain_cfg("mde"), {"train.epochs": 3, "train.lr": 1e-12,
                                                "train.patience": 1})
    manifest = _unlabelled(tmp_path / "d", n=32)
    res = run_training(cfg, manifest, tmp_path / "pre")
    assert len(res["history"]) == 3 and res["best_epoch"] == 3

    m = read_manifest(manifest, cfg.task)
    torch.manual_seed(0)
    model = build_global_model(cfg)
    best = fit(model, make_loader(m, cfg.data, train=True), make_loader(m, cfg.data, train=False),
               make_loss(cfg.task, cfg.train, m.targets), cfg.task, cfg.train,
               torch.device("cpu"))
    assert len(best.history) == 2 and best.best_epoch == 1  # what keep="best" would do


def test_data_check_unlabelled_manifest(tmp_path, capsys):
    unlabelled = _unlabelled(tmp_path / "d", n=8)
    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump(_pretrain_cfg().model_dump(mode="json")))
    assert cli_main(["data", "check", str(unlabelled), "--config", str(pre)]) == 0
    assert "ok: 8 images" in capsys.readouterr().out
    # a labelled manifest with blank labels counts as unlabelled images for pretraining
    labelled = tmp_path / "d" / "manifest.csv"
    df = pd.read_csv(labelled, dtype=str, keep_default_na=False)
    df.loc[:3, "bright"] = ""
    df.to_csv(labelled, index=False)
    assert cli_main(["data", "check", str(labelled), "--config", str(pre)]) == 0
    assert re.search(r"unlabelled \(pretraining\) \|\s+8\s", capsys.readouterr().out)
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task": {"type": "multilabel", "labels": ["bright"]}}))
    assert cli_main(["data", "check", str(unlabelled), "--config", str(task)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlabelled manifest is for pretraining" in err[0]


def test_pretrain_config_rules():
    from shared.errors import ConfigError

    cfg = _pretrain_cfg()
    # unset, the mask ratio is each method's own: MAE's 0.75, the implant paper's 0.25 for MDE
    assert cfg.data.augment_policy == "paper" and cfg.pretrain.mask_ratio == 0.75
    assert _pretrain_cfg("mde").pretrain.mask_ratio == 0.25
    assert _pretrain_cfg("mae", mask_ratio=0.25).pretrain.mask_ratio == 0.25
    assert _pretrain_cfg("mde", mask_ratio=None).pretrain.mask_ratio == 0.25
    for bad in ({"model": {"name": "resnet18"}}, {"task": {"type": "pretrain", "labels": ["a"]}},
                {"model": {**VIT, "freeze": 1}}):
        raw = {**_pretrain_cfg().model_dump(mode="json", exclude_unset=True), **bad}
        with pytest.raises(ConfigError):
            config_from_dict(raw)
    with pytest.raises(ConfigError, match="at least one label"):
        config_from_dict({"task": {"type": "multilabel"}})


def test_paper_augmentation_keeps_shape_and_changes_pixels():
    from shared.masked_modeling import PaperAugment

    torch.manual_seed(0)
    x = torch.rand(3, 32, 32)
    outs = [PaperAugment(0.06)(x) for _ in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)
    aug = PaperAugment(0.06)
    views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    for _ in range(20):
        y = aug(x)
        # compared with the flip/rotation it is: at most 6% of the pixel positions replaced,
        # all channels alike (a grey radiograph stays grey)
        changed = min(float((y != v).any(0).float().mean()) for v in views)
        assert changed <= 0.1
        assert any(torch.equal((y != v).any(0), (y != v).all(0)) for v in views)


@pytest.mark.slow  # real Flower simulation (~1-2 min on 2 cores)
def test_federated_mde_pretraining_two_clinics_two_rounds(tmp_path):
    unlabelled = _unlabelled(tmp_path / "d", n=64)
    raw = _pretrain_cfg("mde").model_dump(mode="json")
    raw["federation"] = {"rounds": 2, "local_steps": 4}
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    raw["simulation"] = {"client_cpus": 1, "max_concurrent": 2}
    cfg_path = tmp_path / "fed.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(unlabelled), "--out", str(out)],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    losses = [h["server"]["loss"] for h in data["history"]]
    assert [h["round"] for h in data["history"]] == [0, 1, 2]
    assert losses[2] < losses[0], losses
    for name in ("reconstructions.png", ENCODER_FILE, "model_final.pt", "report.md"):
        assert (out / name).is_file(), name
    assert "## Pretraining (mde" in (out / "report.md").read_text()
    # only the trainable arrays travel: encoder + decoder, no teacher
    model = build_global_model(config_from_dict(raw))
    keys = exchanged_keys(model)
    assert any(k.startswith("decoder.") for k in keys) and any(k.startswith("encoder.")
                                                                for k in keys)
    nbytes = sum(a.numpy().nbytes for a in model_arrays(model).values())
    for h in data["history"][1:]:
        assert h["clinics_replied"] == 2 and h["bytes_received"] == 2 * nbytes


def test_a_sent_teacher_replaces_the_one_derived_from_the_global_encoder():
    model = _model("mde", target_layers=1)
    x = torch.rand(2, 3, 32, 32)
    base = model.targets(x)
    other = {f"encoder.{k}": (v.detach() + 0.05 * torch.randn_like(v)).numpy()
             for k, v in model.encoder.named_parameters()}
    model.load_teacher(other)
    for k, t in model.teacher.named_parameters():
        assert torch.equal(t, torch.from_numpy(other[f"encoder.{k}"]))
    assert not torch.allclose(model.targets(x), base)
    model.load_state_dict(model.state_dict())  # loading weights resets the teacher
    assert torch.equal(model.targets(x), base)
    bad_shape = {**other, "encoder.class_token": np.zeros((1, 1, 3), np.float32)}
    for bad in ({k: v for k, v in other.items() if k != "encoder.class_token"}, bad_shape,
                {**other, "decoder.mask_token": np.zeros(1, np.float32)}):
        with pytest.raises(ValueError, match="teacher"):
            model.load_teacher(bad)
    with pytest.raises(ValueError, match="not an MDE model"):
        _model("mae").load_teacher(other)


def test_teacher_momentum_config_rules():
    from shared.errors import ConfigError

    assert _pretrain_cfg("mde", federated_teacher_momentum=0.9).pretrain \
        .federated_teacher_momentum == 0.9
    with pytest.raises(ConfigError, match="mae has no teacher"):
        _pretrain_cfg("mae", federated_teacher_momentum=0.9)
    raw = _pretrain_cfg("mde", federated_teacher_momentum=0.9).model_dump(
        mode="json", exclude_unset=True)
    raw["privacy"] = {"secagg": {}}
    with pytest.raises(ConfigError, match="secagg"):
        config_from_dict(raw)


def _teacher_federation(tmp_path: Path, momentum: float | None, **fed):
    """The real server loop and ClientApp in process: 2 clinics, 3 rounds of MDE."""
    from shared.config import load_config

    raw = _pretrain_cfg("mde", federated_teacher_momentum=momentum).model_dump(mode="json")
    raw["federation"] = {"rounds": 3, "local_steps": 2, "fraction_evaluate": 0.0,
                         "min_evaluate_clinics": 0, **fed}
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    path = tmp_path / f"cfg-{momentum}-{len(fed)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _in_process(cfg, split: Path, run_dir: Path | None = None, grid=None, resume=False):
    from server.federation import run_federation
    from simulations.bench_quality import InProcessGrid

    grid = grid or InProcessGrid(split, 2, threads=1, resume=resume)
    res = run_federation(grid, cfg, split / "server_test.csv", run_dir=run_dir, resume=resume)
    return res, grid


@pytest.fixture
def mde_split(tmp_path):
    from simulations.simulate import prepare_split

    manifest = _unlabelled(tmp_path / "d", n=48)
    prepare_split(_teacher_federation(tmp_path, None), manifest, tmp_path / "split")
    return tmp_path / "split"


def test_coordinators_ema_teacher_goes_out_from_round_two_and_the_clinics_use_it(
        tmp_path, mde_split):
    """federated_teacher_momentum m: round r's train messages carry T, the moving average
    of the global encoders G_0..G_{r-1}, from round 2 on; m = 0 (T = the global encoder)
    trains exactly as no teacher sent; m = 0.5 trains otherwise; fp16 downloads round it."""
    from shared.fedio import TEACHER_KEY

    finals, grids = {}, {}
    for m in (None, 0.0, 0.5):
        res, grids[m] = _in_process(_teacher_federation(tmp_path, m), mde_split)
        finals[m] = res.evaluator.final_state
    same = max(float((finals[None][k] - finals[0.0][k]).abs().max()) for k in finals[None])
    assert same == 0.0
    assert max(float((finals[None][k] - finals[0.5][k]).abs().max()) for k in finals[None]) > 0

    sent = grids[0.5].sent[0::2]
    train = [msg for msg in sent if msg.metadata.message_type.startswith("train")]
    assert len(train) == 6
    by_round = [train[i:i + 2] for i in (0, 2, 4)]
    assert all(TEACHER_KEY not in msg.content.array_records for msg in by_round[0])
    g = [{k: a.numpy() for k, a in r[0].content["arrays"].items()} for r in by_round]
    enc = [k for k in g[0] if k.startswith("encoder.")]
    teacher = {k: g[0][k] for k in enc}
    for r in (1, 2):
        teacher = {k: 0.5 * teacher[k] + 0.5 * g[r][k] for k in enc}
        for msg in by_round[r]:
            got = msg.content[TEACHER_KEY]
            assert sorted(got.keys()) == sorted(enc)
            for k in enc:
                np.testing.assert_allclose(got[k].numpy(), teacher[k], atol=1e-6)
    assert all(TEACHER_KEY not in reply.content.array_records
               for reply in grids[0.5].sent[1::2])  # nothing new comes back

    _, half = _in_process(_teacher_federation(tmp_path, 0.5, download="fp16"), mde_split)
    later = [msg for msg in half.sent[0::2]
             if msg.metadata.message_type.startswith("train")][2:]
    assert later and all(a.numpy().dtype == np.float16 for msg in later
                         for a in msg.content[TEACHER_KEY].values())


def test_resume_keeps_the_coordinators_teacher(tmp_path, mde_split):
    """3 rounds straight, versus a coordinator killed in round 3 and resumed from its
    checkpoint: the same final model only if the teacher came back from the checkpoint."""
    import shutil

    from simulations.bench_quality import InProcessGrid

    class Crashing(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].content["config"].get("server-round") == 3:
                raise KeyboardInterrupt("coordinator killed")
            return super().send_and_receive(messages, timeout=timeout)

    cfg = _teacher_federation(tmp_path, 0.5)
    straight, _ = _in_process(cfg, mde_split, tmp_path / "run_a")
    split_b = tmp_path / "split_b"
    shutil.copytree(mde_split, split_b)
    with pytest.raises(KeyboardInterrupt):
        _in_process(cfg, split_b, tmp_path / "run_b", grid=Crashing(split_b, 2, threads=1))
    resumed, _ = _in_process(cfg, split_b, tmp_path / "run_b", resume=True)
    a, b = straight.evaluator.final_state, resumed.evaluator.final_state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_bench_pretrain_combines_invocations_and_refuses_clashes(tmp_path):
    """Rows run side by side (one invocation each) are tabled and paired by seed as one run
    would be; another setting or the same row and seed with other figures is an error."""
    from simulations.bench_pretrain import SAME_SETTING, combine

    args = {**{k: "x" for k in SAME_SETTING}, "finetune_repeats": "1"}

    def write(name: str, rows: dict, **changed) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"args": {**args, **changed}, "results": {
            row: {"seeds": {str(s): {"ufba": {"probe": {"class token": v, "mean of patches": v}},
                                     "seconds": 1.0}
                            for s, v in seeds.items()}} for row, seeds in rows.items()}}))
        return path

    a = write("a", {"random init": {0: 0.70, 1: 0.72}})
    b = write("b", {"federated MDE": {0: 0.73}})
    c = write("c", {"federated MDE": {1: 0.75}, "random init": {1: 0.72}})
    text, results = combine([a, b, c])
    assert sorted(results["federated MDE"]["seeds"]) == [0, 1]
    assert "federated MDE - random init = 3.000 ± 0.000 points (seeds [0, 1])" in text
    text, _ = combine([a, c, write("h", {"federated MAE": {1: 0.70}})])
    assert "federated MDE - federated MAE = 5.000 points (seeds [1])" in text
    with pytest.raises(SystemExit, match="differs"):
        combine([a, write("d", {"random init": {1: 0.71}})])
    with pytest.raises(SystemExit, match="image_size"):
        combine([a, write("e", {"federated MDE": {0: 0.73}}, image_size="y")])

    def finetuned(name: str, mode: str, auc: float) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"args": args, "results": {"pooled MDE": {"seeds": {"0": {
            "pretrain_loss": [0.9, 0.5], "ufba": {mode: {"macro_auc": auc}}, "seconds": 1.0}}}}}))
        return path

    # a pooled and a federated fine-tuning of the same encoders make one row, both columns
    fed = finetuned("fed", "federated", 0.65)
    text, results = combine([finetuned("pooled", "pooled", 0.68), fed])
    assert results["pooled MDE"]["seeds"][0]["ufba"] == {"pooled": {"macro_auc": 0.68},
                                                         "federated": {"macro_auc": 0.65}}
    assert "| pooled MDE | 0.680 | 0.650 | not run | not run | 0.900 -> 0.500 |" in text
    with pytest.raises(SystemExit, match="federated, macro_auc: the file differs"):
        combine([fed, finetuned("fed2", "federated", 0.66)])
    # files written before --finetune-repeats existed meant one fine-tuning per encoder
    old = tmp_path / "old.json"
    data = json.loads(b.read_text())
    del data["args"]["finetune_repeats"]
    old.write_text(json.dumps(data))
    assert sorted(combine([old, write("f", {"random init": {0: 0.7}}, finetune_repeats="1")]
                          )[1]) == ["federated MDE", "random init"]
    with pytest.raises(SystemExit, match="finetune_repeats"):
        combine([old, write("g", {"random init": {0: 0.7}}, finetune_repeats="4")])


def test_bench_pretrain_reuses_kept_encoders_only_of_the_same_pretraining(tmp_path):
    """--encoders-from finds an earlier --keep invocation's encoder file and loss curve; other
    pretraining settings, a missing file or a missing row is an error, while other
    fine-tuning settings are allowed (that is what reusing is for)."""
    import argparse

    from simulations.bench_pretrain import PRETRAIN_SETTING, kept_encoder

    args = argparse.Namespace(**{k: "x" for k in PRETRAIN_SETTING}, finetune_set="a=1", lr=1)
    kept = tmp_path / "P"
    encoder = kept / "runs-seed1" / "pre-pooled-MDE-s1" / "encoder.pt"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"weights")

    def write(**changed) -> None:
        (kept / "pretrain.json").write_text(json.dumps({
            "args": {**{k: "x" for k in PRETRAIN_SETTING}, "lr": "0.5", **changed},
            "results": {"pooled MDE": {"seeds": {"1": {"pretrain_loss": [0.9, 0.4]}}}}}))

    write()
    other = tmp_path / "F"  # another invocation's folder, without this row: passed over
    other.mkdir()
    (other / "pretrain.json").write_text(json.dumps({"args": {}, "results": {}}))
    path, curve = kept_encoder("pooled MDE", 1, [other, kept], args)
    assert path == encoder and curve == [0.9, 0.4]
    with pytest.raises(SystemExit, match="no pretrain.json"):
        kept_encoder("pooled MDE", 1, [tmp_path / "runs-seed1"], args)
    with pytest.raises(SystemExit, match="no 'pooled MDE' encoder of seed 0"):
        kept_encoder("pooled MDE", 0, [kept], args)
    with pytest.raises(SystemExit, match="no 'federated MDE' encoder"):
        kept_encoder("federated MDE", 1, [kept], args)
    write(image_size="y", pretrain_epochs="z")
    with pytest.raises(SystemExit, match="other settings: image_size, pretrain_epochs"):
        kept_encoder("pooled MDE", 1, [kept], args)
    write()
    encoder.unlink()
    with pytest.raises(SystemExit, match="was .* run with --keep"):
        kept_encoder("pooled MDE", 1, [kept], args)


def test_bench_pretrain_federated_variants_change_one_setting_each():
    """Each federated MDE variant is federated MDE with one setting changed (else pairing it
    with federated MDE would measure more than the variant); equal steps gives the clinics
    batch / clinics, so 4 clinics averaged take as many steps per pass as pooled training."""
    import argparse

    from simulations.bench_pretrain import ENCODERS, FEDERATED_MDE, pretrain_config

    args = argparse.Namespace(
        image_size=128, batch_size=32, lr=5e-4, device="cpu", vit="tiny", patch=16, depth=6,
        decoder_dim=128, decoder_depth=2, pretrain_epochs=100, pretrain_lr=1e-4,
        pretrain_betas=[0.9, 0.95], pretrain_schedule="cosine", pretrain_warmup=2,
        norm_pix_loss=False, teacher_momentum=0.9, clinics=4)

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items() for k2, v2 in
                (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict)
                 else [(prefix + k, v)])}

    plain = flat(pretrain_config(ENCODERS["federated MDE"], args, seed=3))
    assert "federation.batch_size" not in plain and plain["split.seed"] == 3
    changed = {}
    for name in FEDERATED_MDE:
        cfg = flat(pretrain_config(ENCODERS[name], args, seed=3))
        changed[name] = {k: cfg.get(k) for k in cfg.keys() | plain.keys()
                         if cfg.get(k) != plain.get(k)}
    assert changed == {
        "federated MDE": {},
        "federated MDE EMA teacher": {"pretrain.federated_teacher_momentum": 0.9},
        "federated MDE kept AdamW": {"federation.keep_optimizer_state": True},
        "federated MDE equal steps": {"federation.batch_size": 8},
    }
    pooled = flat(pretrain_config(ENCODERS["pooled MDE"], args, seed=3))
    assert not any(k.startswith(("federation.", "split.")) for k in pooled)


def test_bench_pretrain_pairs_repeated_fine_tunings_run_by_run():
    """--finetune-repeats: every run is tabled under its encoder seed, and differences pair the
    runs that shared a fine-tuning seed (split, head, data order), not the seeds' means."""
    from simulations.bench_pretrain import repeat_tables

    def row(runs: dict[int, list[float]]) -> dict:
        return {"seeds": {s: {"ufba": {"federated": {"macro_auc": sum(v) / len(v),
                                                     "repeats": v}}}
                          for s, v in runs.items()}}

    text = repeat_tables({"random init": row({0: [0.60, 0.70], 1: [0.65, 0.55]}),
                          "federated MDE": row({0: [0.62, 0.69], 1: [0.70, 0.60]}),
                          "pooled MDE": row({0: [0.70, 0.60]}),
                          "pooled MAE": row({0: [0.65, 0.62]})})
    assert "| random init | 0.650 (0.600, 0.700) | 0.600 (0.650, 0.550) |" in text
    assert "| pooled MAE | 0.635 (0.650, 0.620) | not run |" in text
    # run by run +2, -1, +5, +5 points: mean 2.75, ahead in 3 of 4
    assert ("federated MDE - random init = 2.750 ± 2.872 points over 4 runs, ahead in 3"
            in text)
    # the issue's method question, MDE against MAE, paired run by run where both ran: +5, -2
    assert "pooled MDE - pooled MAE = 1.500 ± 4.950 points over 2 runs, ahead in 1" in text
    assert "federated MDE - federated MAE" not in text  # no federated MAE row
    assert repeat_tables({"random init": {"seeds": {0: {"ufba": {"federated": {
        "macro_auc": 0.6}}}}}}) == ""  # one fine-tuning an encoder: nothing to add
