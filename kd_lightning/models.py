"""Networks: MLP, SmallCNN (images), CNN1D (signals), and torchvision's and timm's classification
networks (:class:`TorchvisionNet`, :class:`TimmNet`). Every network is ``Net(input_shape, num_classes, ...)``:
the first two arguments come from the DataModule (linked by the CLI), the rest from the config's
``init_args``."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Hinton et al.'s MNIST teacher is ``hidden=(1200, 1200), dropout=0.5`` (with input jitter), the
    student ``hidden=(800, 800)`` with no regularisation.

    Args:
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        num_classes: number of output logits.
        hidden: sizes of the hidden layers; ``()`` is logistic regression.
        dropout: dropout after every hidden layer.
        input_dropout: dropout on the input (the paper's teacher used 0.2).

    Example:
        >>> MLP((1, 28, 28), 10, hidden=(800, 800))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: tuple[int, ...] = (800, 800),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """VGG-style CNN for small images: stages of two 3x3 conv-BN-ReLU then 2x2 max-pool, then an MLP head.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        channels: output channels of each stage; each stage halves the resolution.
        head: hidden size of the classifier head.
        dropout: dropout before each head layer.
        channels_last: keep activations NHWC, which oneDNN (CPU) and tensor cores (GPU) run faster
            (about 1.25x per training step on a 2-core CPU).

    Example:
        >>> SmallCNN((1, 28, 28), 10, channels=(8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, ...] = (16, 32),
        head: int = 256,
        dropout: float = 0.3,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs `input_shape` (C, H, W), got {tuple(input_shape)}.")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += _conv_bn(c, out) + _conv_bn(out, out) + [nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * h * w, head),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head, num_classes),
        )
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """A small 1-D CNN for signals such as MNIST-1D: three strided conv-ReLU layers, then a linear head.

    Args:
        input_shape: ``(channels, length)``.
        num_classes: number of output logits.
        channels: width of the three convolutions.

    Raises:
        ValueError: ``input_shape`` is not ``(channels, length)``.

    Example:
        >>> CNN1D((1, 40), 10, channels=8)(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"CNN1D needs `input_shape` (C, L), got {tuple(input_shape)}.")
        c, length = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(c, channels, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, c, length)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------
# Networks of torchvision and timm, adapted to ``Net(input_shape, num_classes)``.

_LOAD_PRETRAINED: ContextVar[bool] = ContextVar("kd_lightning_load_pretrained", default=True)


@contextmanager
def checkpoint_weights() -> Iterator[None]:
    """Build :class:`TorchvisionNet` / :class:`TimmNet` networks without their pretrained ``weights``.

    Used while a checkpoint is reloaded: its own weights replace the pretrained ones at once, so there is
    nothing to download, and a local weights file that has since moved is not needed.

    Example:
        >>> with checkpoint_weights():
        ...     TorchvisionNet((3, 32, 32), 4, "resnet18", weights="/no/such/file.pt").head_name
        'model.fc'
    """
    token = _LOAD_PRETRAINED.set(False)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


@dataclass(frozen=True)
class Family:
    """Where a torchvision family keeps the layers that :class:`TorchvisionNet` adapts.

    Attributes:
        head: qualified name of the layer that outputs the logits (an ``nn.Linear``, or SqueezeNet's 1x1
            ``nn.Conv2d``): replaced when the number of classes differs.
        stem: qualified name of the first convolution: rebuilt when the input's channels are not 3.
        min_size: smallest input height and width the family accepts (measured with random weights).
        sized: the builder takes the input's ``image_size`` (the vision transformer's position embeddings);
            its side must then be a multiple of the patch size.
    """

    head: str
    stem: str
    min_size: int
    sized: bool = False


def _torchvision_families() -> dict[type[nn.Module], Family]:
    from torchvision import models

    return {
        models.ResNet: Family("fc", "conv1", 1),  # resnet*, resnext*, wide_resnet*
        models.MobileNetV2: Family("classifier.1", "features.0.0", 1),
        models.MobileNetV3: Family("classifier.3", "features.0.0", 1),
        models.EfficientNet: Family("classifier.1", "features.0.0", 1),  # efficientnet_b*, efficientnet_v2_*
        models.ConvNeXt: Family("classifier.2", "features.0.0", 32),
        models.RegNet: Family("fc", "stem.0", 1),
        models.ShuffleNetV2: Family("fc", "conv1.0", 1),
        models.SqueezeNet: Family("classifier.1", "features.0", 21),
        models.DenseNet: Family("classifier", "features.conv0", 29),
        models.VGG: Family("classifier.6", "features.0", 32),
        models.MNASNet: Family("classifier.1", "layers.0", 1),
        models.SwinTransformer: Family("head", "features.0.0", 4),  # swin_*, swin_v2_*
        models.VisionTransformer: Family("heads.head", "conv_proj", 1, sized=True),
    }


def torchvision_names() -> list[str]:
    """The torchvision classification networks :class:`TorchvisionNet` builds: those of the families in
    its table (googlenet, inception_v3, alexnet and maxvit_t are not among them).

    Example:
        >>> {"resnet18", "mobilenet_v3_small", "vit_b_16"} <= set(torchvision_names()), "googlenet" in torchvision_names()
        (True, False)
    """
    from torchvision import models

    modules = {cls.__module__ for cls in _torchvision_families()}
    return [n for n in models.list_models(module=models) if models.get_model_builder(n).__module__ in modules]


def _outputs(layer: nn.Module) -> int:
    """Number of logits a head layer outputs (``nn.Linear`` or 1x1 ``nn.Conv2d``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    raise TypeError(f"a classifier head is an nn.Linear or a 1x1 nn.Conv2d, got {type(layer).__name__}.")


def _new_head(layer: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised head like ``layer`` (same input width) with ``num_classes`` outputs."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, bias=layer.bias is not None)
    raise TypeError(f"a classifier head is an nn.Linear or a 1x1 nn.Conv2d, got {type(layer).__name__}.")


@torch.no_grad()
def adapt_stem(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """``conv`` for inputs of ``channels`` channels; pretrained filters are kept, summed over RGB for one
    channel, else repeated over the channels and scaled by ``3 / channels`` (as timm does).

    Example:
        >>> rgb = nn.Conv2d(3, 4, 3)
        >>> grey = adapt_stem(rgb, 1)
        >>> grey.in_channels, torch.allclose(grey.weight, rgb.weight.sum(1, keepdim=True))
        (1, True)
    """
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    weight = conv.weight
    if channels == 1:
        new.weight.copy_(weight.sum(1, keepdim=True))
    else:
        repeats = math.ceil(channels / weight.shape[1])
        new.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


def _read_state_dict(path: Path, argument: str) -> dict[str, Tensor]:
    """The tensors of a state-dict file (``torch.save(model.state_dict(), path)``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: name the argument and the file
        raise ValueError(f"`{argument}`: cannot read {str(path)!r} as a state dict: {err}") from err
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise ValueError(
            f"`{argument}`: {str(path)!r} is not a state dict (a dict of tensors, as "
            "`torch.save(model.state_dict(), path)` writes); got "
            f"{type(state).__name__}{' with ' + repr(sorted(state)[:5]) if isinstance(state, dict) else ''}."
        )
    return state


class TorchvisionNet(nn.Module):
    """A torchvision classification network as ``Net(input_shape, num_classes)``: any model of
    :func:`torchvision_names`, chosen by ``name``, optionally pretrained.

    The network is built, loaded with ``weights``, then adapted to the data: the classifier head (the
    family's layer in a typed table, :class:`Family`) is replaced by a new one when ``num_classes``
    differs from the weights' classes, and the first convolution is rebuilt for inputs without 3
    channels (pretrained filters summed over RGB for grey images). Inputs smaller than the family's
    ``min_size`` are refused; the vision transformers are built for the input's size (a multiple of
    the patch size), with pretrained position embeddings interpolated to it.

    ``head_name`` (:class:`~kd_lightning.contracts.ClassifierHead`) names the adapted head, which the
    specialists' initialisation copies rows of.

    Args:
        input_shape: ``(C, H, W)``, linked from the data.
        num_classes: number of output logits, linked from the data.
        name: a torchvision model name, e.g. ``resnet18``, ``mobilenet_v3_small``, ``efficientnet_b0``.
        weights: ``None`` (random initialisation); a torchvision weights name of ``name``, e.g.
            ``DEFAULT`` or ``IMAGENET1K_V1`` (downloaded once into ``$TORCH_HOME``, which needs the
            internet); or the path of a local state dict file of this model (``torch.save(model.state_dict())``),
            whose head may have any number of classes.

    Raises:
        ValueError: an unknown ``name`` (the message lists the available ones), an unknown ``weights``
            name or unreadable file, a state dict of another architecture, or inputs of the wrong shape.

    Example:
        >>> net = TorchvisionNet((1, 28, 28), 10, "mobilenet_v3_small")
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.head_name
        (torch.Size([2, 10]), 'model.classifier.3')
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        name: str,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision import models

        names = torchvision_names()
        if name not in names:
            raise ValueError(
                f"`name`: no torchvision classification network {name!r}; available: {', '.join(names)}."
            )
        if len(input_shape) != 3:
            raise ValueError(
                f"TorchvisionNet({name!r}) needs image inputs `input_shape` (C, H, W), got {tuple(input_shape)}."
            )
        channels, height, width = (int(s) for s in input_shape)
        builder = models.get_model_builder(name)
        family = next(f for cls, f in _torchvision_families().items() if cls.__module__ == builder.__module__)
        if min(height, width) < family.min_size:
            raise ValueError(
                f"TorchvisionNet({name!r}) needs inputs of at least {family.min_size}x{family.min_size} pixels, "
                f"got `input_shape` {tuple(input_shape)}; resize the images (e.g. the ImageFolder's `image_size`)."
            )
        state = self._pretrained_state(name, weights) if _LOAD_PRETRAINED.get() else None
        kwargs: dict[str, Any] = {}
        if family.sized:
            if height != width:
                raise ValueError(
                    f"TorchvisionNet({name!r}) needs square inputs, got `input_shape` {tuple(input_shape)}."
                )
            kwargs["image_size"] = height
        head_rows = (
            num_classes if state is None else state.get(f"{family.head}.weight", torch.empty(0)).shape[0]
        )
        model = builder(weights=None, num_classes=head_rows or num_classes, **kwargs)
        if state is not None:
            if family.sized:
                from torchvision.models.vision_transformer import interpolate_embeddings

                state = interpolate_embeddings(height, model.patch_size, state)
            own = model.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
            if missing or unexpected or shapes:
                raise ValueError(
                    f"`weights` {weights!r} do not fit torchvision's {name!r}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, different shapes {shapes[:5]}."
                )
            model.load_state_dict(state)
        if _outputs(model.get_submodule(family.head)) != num_classes:
            model.set_submodule(family.head, _new_head(model.get_submodule(family.head), num_classes))
        stem = model.get_submodule(family.stem)
        if channels != stem.in_channels:
            model.set_submodule(family.stem, adapt_stem(stem, channels))
        self.model = model
        self.name = name
        self.input_shape = (channels, height, width)
        self.head_name = f"model.{family.head}"

    @staticmethod
    def _pretrained_state(name: str, weights: str | None) -> dict[str, Tensor] | None:
        from torchvision import models

        if weights is None:
            return None
        enum = models.get_model_weights(name)
        known = [w for w in enum.__members__ if w != "DEFAULT"]
        if weights.removeprefix(f"{enum.__name__}.") in enum.__members__:
            return enum.verify(weights).get_state_dict(progress=False, check_hash=True)
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(
                f"`weights`: {weights!r} is neither a weights name of {name!r} (DEFAULT, {', '.join(known)}) "
                "nor a state dict file (no such file)."
            )
        return _read_state_dict(path, "weights")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class TimmNet(nn.Module):
    """A timm network as ``Net(input_shape, num_classes)`` (needs ``pip install timm``).

    timm builds the head for ``num_classes`` and the stem for the input's channels itself
    (``timm.create_model(name, num_classes=..., in_chans=...)``); ``head_name``
    (:class:`~kd_lightning.contracts.ClassifierHead`) is the classifier timm records in the model's
    ``pretrained_cfg``.

    Args:
        input_shape: ``(C, H, W)``, linked from the data.
        num_classes: number of output logits, linked from the data.
        name: a timm model name, e.g. ``resnet18.a1_in1k`` or ``convnext_nano``.
        weights: ``None`` (random initialisation), ``"DEFAULT"`` (timm's pretrained weights, downloaded
            from the Hugging Face hub) or the path of a local state dict of this model (any head size).

    Raises:
        ImportError: timm is not installed.
        ValueError: an unknown ``name`` (the message lists close matches) or an unreadable ``weights`` file.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, name: str, weights: str | None = None
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError(
                f"TimmNet({name!r}) needs the `timm` package, which is not installed: `pip install timm`, "
                "or use kd_lightning.models.TorchvisionNet."
            ) from err
        if not timm.is_model(name):
            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=10)
            raise ValueError(
                f"`name`: timm has no model {name!r}; close names: {', '.join(close) or 'none'}."
            )
        load = _LOAD_PRETRAINED.get() and weights is not None
        path = None if not load or weights == "DEFAULT" else Path(weights).expanduser()
        if path is not None and not path.is_file():
            raise ValueError(
                f"`weights`: {weights!r} is neither DEFAULT nor a state dict file (no such file)."
            )
        model = timm.create_model(
            name, pretrained=load and path is None, num_classes=num_classes, in_chans=int(input_shape[0])
        )
        if path is not None:
            state = _read_state_dict(path, "weights")
            head = model.pretrained_cfg["classifier"]
            own = model.state_dict()
            # A head of another size (e.g. 1,000 ImageNet classes) stays newly initialised.
            state = {
                k: v for k, v in state.items() if not (k.startswith(f"{head}.") and v.shape != own[k].shape)
            }
            missing = [k for k in own if k not in state and not k.startswith(f"{head}.")]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                raise ValueError(
                    f"`weights` {weights!r} do not fit timm's {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}."
                )
            model.load_state_dict(state, strict=False)
        self.model = model
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.head_name = f"model.{model.pretrained_cfg['classifier']}"

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
