from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from shared.config import ModelConfig, TrainConfig
from shared.errors import ConfigError, WeightsError
from shared.losses import MaskedBCE
from shared.models import build_model, stages, trainable_state_keys
from shared.training import make_optimizer, set_train_mode


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**kw)


def test_resnet18_loads_local_torchvision_file_and_replaces_head(tmp_path):
    src = torchvision.models.resnet18(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    digest = hashlib.sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    m = build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "r18.pth"),
                         pretrained_sha256=digest), num_outputs=10)
    assert m.fc.out_features == 10
    assert torch.equal(m.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    with pytest.raises(WeightsError, match="sha256 .* does not match"):
        build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "r18.pth"),
                         pretrained_sha256="00" * 32), num_outputs=10)


def test_weights_mismatch_is_a_clear_error(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"does not fit ResNet: .*unexpected key"):
        build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "r34.pth")), 2)
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    del sd["layer4.1.bn2.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing key.*layer4\.1\.bn2\.bias.*mis-shaped key"
                                           r".*layer1\.0\.conv1\.weight \(64, 64, 5, 5\)"):
        build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "broken.pth")), 2)
    with pytest.raises(WeightsError, match="not found"):
        build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "nope.pth")), 2)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
        build_model(_cfg(name="resnet18", pretrained=str(tmp_path / "junk.pth")), 2)


def test_submodule_file_with_prefix(tmp_path):
    feats = torchvision.models.mobilenet_v2().features
    torch.save(feats.state_dict(), tmp_path / "mnv2_features.pth")
    m = build_model(_cfg(name="mobilenet_v2", pretrained=str(tmp_path / "mnv2_features.pth"),
                         pretrained_prefix="features."), 5)
    assert torch.equal(m.features[3].conv[0][0].weight, feats[3].conv[0][0].weight)
    assert m.classifier[-1].out_features == 5
    with pytest.raises(WeightsError, match="needs model.pretrained_prefix"):
        build_model(_cfg(name="mobilenet_v2", pretrained=str(tmp_path / "mnv2_features.pth")), 5)


def test_real_imagenet_mobilenet_features_from_shared(shared_data):
    path = shared_data / "weights" / "torchvision_mobilenet_v2_features_in1k.pth"
    m = build_model(_cfg(name="mobilenet_v2", pretrained=str(path),
                         pretrained_prefix="features.", pretrained_sha256="c689c012"), 5)
    w = m.features[0][0].weight
    # ImageNet first-layer filters are far from a fresh Kaiming init: not all-small, structured
    fresh = torchvision.models.mobilenet_v2().features[0][0].weight
    assert not torch.allclose(w, fresh)
    assert w.abs().max() > 1.0


def test_frozen_parameters_and_bn_stats_do_not_change():
    torch.manual_seed(0)
    m = build_model(_cfg(name="resnet18", freeze=4), 3)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1", "layer2", "layer3"))
                          for n in frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith(("layer4", "fc")))
    bn_before = m.layer2[0].bn1.running_mean.clone()
    l4_before = m.layer4[0].bn1.running_mean.clone()
    fc_before = m.fc.weight.detach().clone()
    opt = make_optimizer(m, TrainConfig(lr=0.1))
    set_train_mode(m)
    for _ in range(2):
        opt.zero_grad()
        MaskedBCE()(m(torch.randn(4, 3, 32, 32) * 3), torch.ones(4, 3)).backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert torch.equal(m.layer2[0].bn1.running_mean, bn_before)
    assert not torch.equal(m.layer4[0].bn1.running_mean, l4_before)
    assert not torch.equal(m.fc.weight, fc_before)
    keys = trainable_state_keys(m)
    assert "fc.weight" in keys and "layer4.0.bn1.running_mean" in keys
    assert not any(k.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")) for k in keys)


def test_freeze_4_is_the_ofc_studys_first_7_children_of_resnet18():
    m = build_model(_cfg(name="resnet18", freeze=4), 10)
    first7 = {id(p) for child in list(m.children())[:7] for p in child.parameters()}
    assert {id(p) for p in m.parameters() if not p.requires_grad} == first7


def test_vit_sizes_patch_and_freeze():
    m = build_model(_cfg(name="vit", vit={"size": "tiny", "patch_size": 8, "depth": 2},
                         freeze=2), 3, image_size=32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert len(stages(m)) == 3  # patch embedding + 2 blocks
    keys = trainable_state_keys(m)
    assert not any(k.startswith(("conv_proj", "class_token", "encoder.pos_embedding",
                                 "encoder.layers.encoder_layer_0")) for k in keys)
    assert any(k.startswith("encoder.layers.encoder_layer_1") for k in keys)
    assert "heads.head.weight" in keys
    with pytest.raises(ConfigError, match="not a multiple"):
        build_model(_cfg(name="vit", vit={"patch_size": 7}), 3, image_size=32)


def test_factory_errors_and_other_torchvision_models():
    with pytest.raises(ConfigError, match="not 'vit' or a torchvision"):
        build_model(_cfg(name="resnet1800"), 2)
    with pytest.raises(ConfigError, match="has 5 freezable stages"):
        build_model(_cfg(name="resnet18", freeze=7), 2)
    m = build_model(_cfg(name="efficientnet_b0", freeze=3), 4)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4)
