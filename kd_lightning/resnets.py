"""Residual networks for small images: the teachers and students of the distillation literature.

Three families, all following the project's network convention ``Net(input_shape, num_classes, ...)``
and returning raw logits of shape ``(N, num_classes)``:

* :class:`SmallImageResNet`: torchvision's ResNet-18/34/50 with a 3x3 stride-1 stem and no max-pool,
  the usual adaptation to 32x32 images (a 7x7 stride-2 stem plus max-pool would leave a 1x1 map
  before the last stage).
* :class:`CifarResNet`: the three-stage, depth ``6n+2`` ResNets of He et al. (2016) as used by
  RepDistiller (Tian et al., 2020) and mdistiller, including the widened ``resnet8x4``/``resnet32x4``
  teacher-student pair.
* :class:`WideResNet`: pre-activation wide ResNets (Zagoruyko & Komodakis, 2016), again as in
  RepDistiller, so that ``wrn_40_2``/``wrn_16_2`` match the published parameter counts.

Every model ends with adaptive average pooling, so any input size works (e.g. 1x28x28 Fashion-MNIST);
for 3x32x32 inputs the result is identical to the references' fixed ``AvgPool2d(8)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

ResidualBlock = type[BasicBlock] | type[Bottleneck]

# torchvision's stage layouts; only the stem differs from the ImageNet models.
SMALL_IMAGE_RESNET_LAYOUTS: dict[int, tuple[ResidualBlock, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def _in_channels(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (channels, height, width), got {tuple(input_shape)}.")
    return int(input_shape[0])


def _residual_stage(
    block: ResidualBlock, in_planes: int, planes: int, num_blocks: int, stride: int
) -> tuple[nn.Sequential, int]:
    """Stack ``num_blocks`` torchvision blocks; return the stage and its output channel count.

    The first block gets a 1x1 conv + BN projection shortcut whenever the shape changes, exactly as in
    torchvision and in RepDistiller's CIFAR ResNets (their "option B"); this is what makes the
    parameter counts match the published tables.
    """
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    blocks = [block(in_planes, planes, stride, downsample)]
    blocks += [block(out_planes, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks), out_planes


def _init_weights(model: nn.Module) -> None:
    # He initialisation with fan_out, unit BN: torchvision's, RepDistiller's and Zagoruyko's choice
    # (WRN's normal(0, sqrt(2 / (k*k*out_channels))) is the same distribution).
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SmallImageResNet(nn.Module):
    """torchvision's ResNet with a small-image stem: 3x3 stride-1 conv, BN, ReLU and no max-pool.

    With ``width=64`` and ``depth=18`` this is the common "ResNet-18 for CIFAR" (11,173,962 parameters
    for 10 classes).

    Args:
        input_shape: ``(channels, height, width)`` of one input.
        num_classes: number of output logits.
        depth: 18, 34, 50, 101 or 152; picks the block type and stage layout as in torchvision.
        width: channels of the stem and of the first stage; later stages double it (the bottleneck
            stages output four times as many channels).

    Example:
        >>> net = SmallImageResNet((1, 28, 28), 10, depth=18, width=8)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, depth: int = 18, width: int = 64):
        super().__init__()
        if depth not in SMALL_IMAGE_RESNET_LAYOUTS:
            raise ValueError(f"`depth` must be one of {sorted(SMALL_IMAGE_RESNET_LAYOUTS)}, got {depth!r}.")
        if width < 1:
            raise ValueError(f"`width` must be positive, got {width!r}.")
        block, layout = SMALL_IMAGE_RESNET_LAYOUTS[depth]
        self.stem = nn.Sequential(
            conv3x3(_in_channels(input_shape), width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages = []
        channels = width
        for i, num_blocks in enumerate(layout):
            stage, channels = _residual_stage(
                block, channels, width * 2**i, num_blocks, stride=1 if i == 0 else 2
            )
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), depth ``6n+2``, as used throughout the KD literature.

    A 3x3 stem conv to ``widths[0]`` channels, then three stages of ``n`` basic blocks with
    ``widths[1:]`` channels (strides 1, 2, 2), global average pooling and a linear classifier.
    Shortcuts that change shape are 1x1 conv + BN projections, as in RepDistiller and mdistiller;
    He et al.'s parameter-free "option A" would give slightly smaller counts (e.g. 0.27M vs 0.28M
    for resnet20 on CIFAR-10).

    Args:
        input_shape: ``(channels, height, width)`` of one input.
        num_classes: number of output logits.
        depth: total number of weighted layers, ``6n+2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: channels of the stem and of the three stages.

    Example:
        >>> net = CifarResNet((3, 32, 32), 10, depth=8, widths=(4, 4, 8, 16))
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 20,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"`depth` must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}.")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"`widths` must be four positive channel counts, got {tuple(widths)!r}.")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            conv3x3(_in_channels(input_shape), widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        channels = widths[0]
        for i, planes in enumerate(widths[1:]):
            stage, channels = _residual_stage(BasicBlock, channels, planes, n, stride=1 if i == 0 else 2)
            stages.append(stage)
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


_CIFAR_WIDTHS = (16, 16, 32, 64)
# The "x4" models widen every stage four times but the stem only twice (32, not 64), as in RepDistiller.
_CIFAR_WIDTHS_X4 = (32, 64, 128, 256)


def resnet8(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-8, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=8, widths=_CIFAR_WIDTHS)


def resnet14(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-14, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=14, widths=_CIFAR_WIDTHS)


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-20, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=20, widths=_CIFAR_WIDTHS)


def resnet32(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-32, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=32, widths=_CIFAR_WIDTHS)


def resnet44(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-44, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=44, widths=_CIFAR_WIDTHS)


def resnet56(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-56, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=56, widths=_CIFAR_WIDTHS)


def resnet110(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """CIFAR ResNet-110, widths (16, 16, 32, 64)."""
    return CifarResNet(input_shape, num_classes, depth=110, widths=_CIFAR_WIDTHS)


def resnet8x4(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """RepDistiller's ResNet-8x4 student, widths (32, 64, 128, 256): 1.23M parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=8, widths=_CIFAR_WIDTHS_X4)


def resnet32x4(input_shape: tuple[int, ...], num_classes: int) -> CifarResNet:
    """RepDistiller's ResNet-32x4 teacher, widths (32, 64, 128, 256): 7.43M parameters on CIFAR-100."""
    return CifarResNet(input_shape, num_classes, depth=32, widths=_CIFAR_WIDTHS_X4)


class _WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

    When the shape changes, the 1x1 projection shortcut reads the *pre-activated* input (after the
    first BN-ReLU), otherwise the shortcut is the raw input; this is the reference WRN behaviour.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = conv3x3(out_planes, out_planes)
        self.dropout = dropout
        self.shortcut = (
            conv1x1(in_planes, out_planes, stride) if stride != 1 or in_planes != out_planes else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, 2016), as in RepDistiller.

    A 3x3 stem conv to 16 channels (no BN: the blocks are pre-activation), three stages of
    ``(depth - 4) / 6`` blocks with ``16k``, ``32k``, ``64k`` channels (strides 1, 2, 2), a final
    BN-ReLU, global average pooling and a linear classifier.

    Args:
        input_shape: ``(channels, height, width)`` of one input.
        num_classes: number of output logits.
        depth: ``6n+4`` (10, 16, 22, 28, 40, ...).
        widen_factor: channel multiplier ``k``.
        dropout: dropout probability between the two convs of each block (0 disables it).

    Example:
        >>> net = WideResNet((1, 28, 28), 10, depth=10, widen_factor=1)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 40,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"`depth` must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}.")
        if widen_factor < 1:
            raise ValueError(f"`widen_factor` must be a positive integer, got {widen_factor!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        n = (depth - 4) // 6
        self.stem = conv3x3(_in_channels(input_shape), 16)
        stages = []
        channels = 16
        for i, planes in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            blocks = [
                _WideBasicBlock(channels if j == 0 else planes, planes, 1 if i == 0 or j > 0 else 2, dropout)
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            channels = planes
        self.stages = nn.Sequential(*stages)
        # The blocks end on a conv, so the trunk needs one last BN-ReLU before pooling.
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        return self.fc(torch.flatten(self.head(self.stages(self.stem(x))), 1))


def wrn_40_2(input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-40-2: 2.26M parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=40, widen_factor=2, dropout=dropout)


def wrn_40_1(input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-40-1: 0.57M parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=40, widen_factor=1, dropout=dropout)


def wrn_16_2(input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-16-2: 0.70M parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=16, widen_factor=2, dropout=dropout)


def wrn_16_1(input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-16-1: 0.18M parameters on CIFAR-100."""
    return WideResNet(input_shape, num_classes, depth=16, widen_factor=1, dropout=dropout)
