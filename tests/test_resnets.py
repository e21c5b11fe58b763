"""Tests for kd_lightning.resnets: published parameter counts, shapes on CIFAR- and MNIST-sized inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kd_lightning import resnets
from kd_lightning.resnets import CifarResNet, SmallImageResNet, WideResNet

CIFAR = (3, 32, 32)
FASHION_MNIST = (1, 28, 28)

FACTORIES: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    name: getattr(resnets, name)
    for name in (
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "wrn_40_2",
        "wrn_40_1",
        "wrn_16_2",
        "wrn_16_1",
    )
}

# Exact counts for 3x32x32 inputs, obtained by rebuilding HobbitLong/RepDistiller's models/resnet.py
# and models/wrn.py (commit eedab9d; megvii-research/mdistiller e8c5bb3 mdistiller/models/cifar/ has
# the same layers) and counting their parameters; with the reference's weights loaded, our models
# give the same logits. Rounded to
# millions they are the figures of the CRD paper's tables (Tian et al., 2020): resnet32x4 7.43M,
# resnet8x4 1.23M, WRN-40-2 2.26M, WRN-16-2 0.70M, WRN-40-1 0.57M, resnet56 0.86M, resnet110 1.74M,
# resnet20 0.28M (CIFAR-100) / 0.27M (CIFAR-10).
REFERENCE_PARAMS = [
    ("resnet32x4", 100, 7_433_860),
    ("resnet8x4", 100, 1_233_540),
    ("wrn_40_2", 100, 2_255_156),
    ("wrn_16_2", 100, 703_284),
    ("wrn_40_1", 100, 569_780),
    ("wrn_16_1", 100, 180_916),
    ("resnet8", 100, 83_892),
    ("resnet20", 100, 278_324),
    ("resnet32", 100, 472_756),
    ("resnet56", 100, 861_620),
    ("resnet110", 100, 1_736_564),
    ("resnet20", 10, 272_474),
    ("resnet56", 10, 855_770),
    ("resnet32x4", 10, 7_410_730),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Two-image batches are too small to split across threads, and when other processes share the
    # cores, OpenMP workers spin at every op's barrier: one thread made these tests ~30x faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "num_classes", "expected"), REFERENCE_PARAMS)
def test_parameter_count_matches_reference(name: str, num_classes: int, expected: int) -> None:
    assert num_params(FACTORIES[name](CIFAR, num_classes)) == expected


def test_small_image_resnet18_matches_common_cifar_resnet18() -> None:
    # kuangliu/pytorch-cifar's ResNet18 (the usual "ResNet-18 for CIFAR-10"): 11,173,962 parameters,
    # i.e. torchvision's resnet18 (11,689,512 for 1000 classes) with the 7x7 stem swapped for a 3x3
    # one and a 10-way classifier.
    assert num_params(SmallImageResNet(CIFAR, 10, depth=18, width=64)) == 11_173_962


@pytest.mark.parametrize("input_shape", [CIFAR, FASHION_MNIST], ids=["3x32x32", "1x28x28"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_forward_shape(name: str, input_shape: tuple[int, ...]) -> None:
    model = FACTORIES[name](input_shape, 7)
    out = model(torch.randn(2, *input_shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("input_shape", [CIFAR, FASHION_MNIST, (3, 20, 24)], ids=["cifar", "fmnist", "odd"])
@pytest.mark.parametrize("depth", [18, 34, 50])
def test_small_image_resnet_forward_shape(depth: int, input_shape: tuple[int, ...]) -> None:
    # A narrow width keeps the deep variants fast; the layout does not depend on it.
    model = SmallImageResNet(input_shape, 5, depth=depth, width=8)
    assert model(torch.randn(2, *input_shape)).shape == (2, 5)


def test_in_channels_only_change_the_stem() -> None:
    # A 1-channel stem has a third of the 3x3 weights of a 3-channel one; nothing else may change.
    stem_weights = 9 * 32
    assert num_params(resnets.resnet8x4(CIFAR, 10)) - num_params(resnets.resnet8x4(FASHION_MNIST, 10)) == (
        2 * stem_weights
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: resnets.resnet8x4(FASHION_MNIST, 10),
        lambda: resnets.wrn_16_1(FASHION_MNIST, 10, dropout=0.3),
        lambda: SmallImageResNet(FASHION_MNIST, 10, depth=50, width=4),
    ],
    ids=["resnet8x4", "wrn_16_1-dropout", "small-resnet50"],
)
def test_backward_reaches_every_parameter(build: Callable[[], nn.Module]) -> None:
    model = build()
    x = torch.randn(2, *FASHION_MNIST)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_eval_mode_is_deterministic_with_dropout() -> None:
    model = resnets.wrn_16_1(CIFAR, 10, dropout=0.5).eval()
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    "build",
    [
        lambda: CifarResNet(CIFAR, 10, depth=21),
        lambda: CifarResNet(CIFAR, 10, depth=2),
        lambda: CifarResNet(CIFAR, 10, widths=(16, 32, 64)),
        lambda: WideResNet(CIFAR, 10, depth=41),
        lambda: WideResNet(CIFAR, 10, widen_factor=0),
        lambda: WideResNet(CIFAR, 10, dropout=1.0),
        lambda: SmallImageResNet(CIFAR, 10, depth=20),
        lambda: SmallImageResNet((32, 32), 10),
    ],
)
def test_invalid_arguments_raise(build: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        build()
