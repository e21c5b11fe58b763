"""TorchvisionNet / TimmNet: every claimed torchvision family builds, runs and distils at 32x32; pretrained
weights load from a local state dict (no network); heads are found by the specialists' initialisation."""

from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from trainers import quiet_trainer

from kd_lightning.models import (
    MLP,
    TimmNet,
    TorchvisionNet,
    _torchvision_families,
    checkpoint_weights,
    torchvision_names,
)
from kd_lightning.modules import ClassifierModule, DistillationModule, load_teacher
from kd_lightning.specialists import head_layer, init_from_generalist

slow = pytest.mark.slow
# One network per claimed family (smallest variant), all at 32x32; the heavy ones are `slow`.
FAMILIES = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "densenet121",
    "mnasnet0_5",
    pytest.param("vgg11", marks=slow),
    pytest.param("swin_t", marks=slow),
    pytest.param("vit_b_32", marks=slow),
]
SHAPE = (3, 32, 32)


def _name(param) -> str:
    return param if isinstance(param, str) else param.values[0]


def test_the_families_tested_are_the_families_claimed():
    builders = {torchvision.models.get_model_builder(_name(p)).__module__ for p in FAMILIES}
    assert builders == {cls.__module__ for cls in _torchvision_families()}
    names = torchvision_names()
    assert {"resnet50", "resnext50_32x4d", "efficientnet_v2_s", "swin_v2_t", "vit_b_16"} <= set(names)
    assert not {"googlenet", "inception_v3", "alexnet", "maxvit_t"} & set(names)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_forward_and_one_distillation_step(name):
    torch.manual_seed(0)
    net = TorchvisionNet(SHAPE, 4, name)
    assert net.eval()(torch.randn(2, *SHAPE)).shape == (2, 4)
    # The specialists' head rule finds the adapted head through the ClassifierHead contract.
    head_name, head = head_layer(net)
    assert head_name == net.head_name and head is net.get_submodule(net.head_name)
    module = DistillationModule(
        student=partial(TorchvisionNet, name=name),
        num_classes=4,
        input_shape=SHAPE,
        teacher=MLP(SHAPE, 4, hidden=(8,)),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    optimizer = module.configure_optimizers()
    before = head.weight.detach().clone()
    module.train()
    batch = {"input": torch.randn(4, *SHAPE), "target": torch.tensor([0, 1, 2, 3]), "index": torch.arange(4)}
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    student_head = module.net.get_submodule(module.net.head_name)
    assert torch.isfinite(loss) and not torch.equal(student_head.weight.detach(), before)


def test_grey_and_small_inputs():
    net = TorchvisionNet((1, 28, 28), 10, "resnet18")
    assert net.model.conv1.in_channels == 1 and net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 29x29 pixels"):
        TorchvisionNet((3, 16, 16), 10, "densenet121")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        TorchvisionNet((784,), 10, "resnet18")


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="no torchvision classification network 'resnet19'") as err:
        TorchvisionNet(SHAPE, 4, "resnet19")
    assert "resnet18" in str(err.value) and "mobilenet_v3_small" in str(err.value)


def test_pretrained_weights_from_a_local_state_dict(tmp_path):
    imagenet = torchvision.models.mobilenet_v3_small()  # 1,000 classes, as a hub download would be
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pt")
    net = TorchvisionNet(SHAPE, 4, "mobilenet_v3_small", weights=str(tmp_path / "imagenet.pt"))
    body = imagenet.state_dict()
    assert torch.equal(net.model.features[3].block[0][0].weight, body["features.3.block.0.0.weight"])
    assert net.model.classifier[3].out_features == 4  # the 1,000-class head replaced
    # A state dict with the data's own classes keeps its head.
    mine = torchvision.models.mobilenet_v3_small(num_classes=4)
    torch.save(mine.state_dict(), tmp_path / "mine.pt")
    again = TorchvisionNet(SHAPE, 4, "mobilenet_v3_small", weights=str(tmp_path / "mine.pt"))
    assert torch.equal(again.model.classifier[3].weight, mine.classifier[3].weight)
    # Grey inputs: the pretrained stem's filters summed over RGB.
    grey = TorchvisionNet((1, 32, 32), 4, "mobilenet_v3_small", weights=str(tmp_path / "imagenet.pt"))
    assert torch.allclose(grey.model.features[0][0].weight, body["features.0.0.weight"].sum(1, keepdim=True))


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"neither a weights name of 'resnet18' \(DEFAULT, IMAGENET1K_V1\)"):
        TorchvisionNet(SHAPE, 4, "resnet18", weights="IMAGENET_V9")
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit torchvision's 'resnet18'"):
        TorchvisionNet(SHAPE, 4, "resnet18", weights=str(tmp_path / "other.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="is not a state dict"):
        TorchvisionNet(SHAPE, 4, "resnet18", weights=str(tmp_path / "list.pt"))


@slow
def test_pretrained_vision_transformer_at_another_size(tmp_path):
    torch.save(torchvision.models.vit_b_32().state_dict(), tmp_path / "vit.pt")  # 224x224, 49 patches
    net = TorchvisionNet(SHAPE, 4, "vit_b_32", weights=str(tmp_path / "vit.pt"))
    assert net.model.encoder.pos_embedding.shape[1] == 1 + 1 and net(torch.zeros(1, *SHAPE)).shape == (1, 4)


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])  # a Linear head and a 1x1-conv head
def test_specialist_starts_from_a_torchvision_generalist(name):
    torch.manual_seed(0)
    generalist = TorchvisionNet(SHAPE, 5, name).eval()
    specialist = TorchvisionNet(SHAPE, 3, name).eval()
    init_from_generalist(specialist, generalist, [1, 3])
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(specialist(x)[:, :2], generalist(x)[:, [1, 3]])


def test_checkpoint_reload_needs_no_pretrained_file(tmp_path):
    """A teacher fine-tuned from a local weights file reloads from its checkpoint after the file is gone."""
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), tmp_path / "w.pt")
    net = partial(TorchvisionNet, name="shufflenet_v2_x0_5", weights=str(tmp_path / "w.pt"))
    module = ClassifierModule(net=net, num_classes=4, input_shape=SHAPE)
    trainer = quiet_trainer(tmp_path, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    (tmp_path / "w.pt").unlink()
    with pytest.raises(ValueError, match="no such file"):
        net((3, 32, 32), 4)
    teacher = load_teacher(tmp_path / "teacher.ckpt")
    torch.testing.assert_close(teacher.net.state_dict(), module.net.state_dict())
    with checkpoint_weights():
        assert isinstance(net((3, 32, 32), 4), nn.Module)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install timm"):
        TimmNet(SHAPE, 4, "resnet18")


def test_timm_networks_when_timm_is_installed(tmp_path):
    timm = pytest.importorskip("timm")
    net = TimmNet((1, 32, 32), 5, "resnet18")
    assert (
        net(torch.zeros(2, 1, 32, 32)).shape == (2, 5) and head_layer(net)[0] == net.head_name == "model.fc"
    )
    imagenet = timm.create_model("resnet18")
    torch.save(imagenet.state_dict(), tmp_path / "r18.pt")
    loaded = TimmNet(SHAPE, 5, "resnet18", weights=str(tmp_path / "r18.pt"))
    assert torch.equal(loaded.model.conv1.weight, imagenet.conv1.weight) and loaded.model.fc.out_features == 5
    with pytest.raises(ValueError, match="close names: .*resnet18"):
        TimmNet(SHAPE, 5, "resnet19")
