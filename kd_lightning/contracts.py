"""The typed contracts between the DataModules, the modules and the callbacks.

A batch is a dict whose keys are fixed here (:class:`Batch`); every module's ``validation_step`` and
``test_step`` return an :class:`EvalOutput` that callbacks (dashboard, clustering) read instead of
running the model again. docs/architecture.md shows where each key is set and read.

Three small runtime-checkable protocols name what is read off a DataModule or a network where one may
offer it: the names of its classes (:class:`NamedClasses`), the shape of one input
(:class:`HasInputShape`) and the layer that outputs the logits (:class:`ClassifierHead`). ``isinstance``
with them sees that the member exists, not its type; on
Python 3.12+ it looks the member up statically (``inspect.getattr_static``), so it must be a plain
attribute or a property, not a submodule that ``nn.Module.__getattr__`` finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypedDict, runtime_checkable

from torch import Tensor

try:  # Python 3.11+
    from typing import NotRequired
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired


class Batch(TypedDict):
    """One collated batch, as the DataModules yield it and the modules read it.

    Keys:
        input: ``(N, *input_shape)`` inputs, possibly augmented.
        target: int64 ``(N,)`` class ids in the dataset's full label space.
        index: int64 ``(N,)`` position of each sample in its source split (training or test file).
        view: int64 ``(N,)`` which replayable augmentation of the sample this is (only with
            ``augment_seed``).
        specialist_target: int64 ``(N,)`` position of ``target`` in a specialist's group, or the group
            size for the dustbin (only for a specialist's data).
        soft_targets: the stored soft targets as a loader gathered them
            (``kd_lightning.cache.SoftTargets``); the soft-target cache replaces them by ``teacher_logits``
            before the step.
        teacher_logits: fp32 ``(N, C)`` the teacher's outputs for these samples (only when a soft-target
            store serves them).
    """

    input: Tensor
    target: Tensor
    index: Tensor
    view: NotRequired[Tensor]
    specialist_target: NotRequired[Tensor]
    soft_targets: NotRequired[object]
    teacher_logits: NotRequired[Tensor]


class EvalOutput(TypedDict):
    """What every module's ``validation_step`` / ``test_step`` returns (detached).

    Keys:
        logits: ``(N, K)`` the model's logits (or log-probabilities, for combinations) over its
            ``K`` outputs: the data's classes, or a specialist's group plus its dustbin.
        target: int64 ``(N,)`` the labels ``logits`` are scored against (a specialist's own labels).
        teacher_logits: ``(N, K)`` the teacher's outputs, for modules that distil from one.
    """

    logits: Tensor
    target: Tensor
    teacher_logits: NotRequired[Tensor]


@runtime_checkable
class NamedClasses(Protocol):
    """Data that names its classes, e.g. ``kd_lightning.datamodules.IndexedDataModule``.

    Attributes:
        class_names: one name per class, in class-id order.

    Example:
        >>> class Names:
        ...     class_names = ["cat", "dog"]
        >>> isinstance(Names(), NamedClasses), isinstance(object(), NamedClasses)
        (True, False)
    """

    @property
    def class_names(self) -> Sequence[str]: ...


@runtime_checkable
class HasInputShape(Protocol):
    """A network or module that records the shape of one input (``None`` where it does not know it).

    Attributes:
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
    """

    input_shape: tuple[int, ...] | None


@runtime_checkable
class ClassifierHead(Protocol):
    """A network that names the layer outputting its logits, e.g. :class:`kd_lightning.models.TorchvisionNet`.

    Networks without it follow the default rule of :func:`kd_lightning.specialists.head_layer` (the last
    ``nn.Linear``); a specialist's initialisation copies rows of this layer.

    Attributes:
        head_name: qualified name (as in ``named_modules()``) of the head: an ``nn.Linear``, or a 1x1
            ``nn.Conv2d`` whose output channels are the logits (SqueezeNet).

    Example:
        >>> class Net:
        ...     head_name = "model.fc"
        >>> isinstance(Net(), ClassifierHead), isinstance(object(), ClassifierHead)
        (True, False)
    """

    head_name: str


def check_eval_output(outputs: object, module: object, reader: str) -> None:
    """Stop with a clear error when a ``validation_step`` did not return an :class:`EvalOutput`.

    Args:
        outputs: what the step returned (``outputs`` of ``on_validation_batch_end``).
        module: the LightningModule whose step it was (named in the message).
        reader: the callback that needs it (named in the message).

    Raises:
        TypeError: ``outputs`` is not a dict with tensors ``logits`` and ``target``.

    Example:
        >>> import torch
        >>> check_eval_output({"logits": torch.zeros(2, 3), "target": torch.zeros(2)}, object(), "me")
        >>> check_eval_output(None, object(), "ConfusionClustering")
        Traceback (most recent call last):
        ...
        TypeError: ConfusionClustering reads the EvalOutput that `object.validation_step` returns (a dict with tensors 'logits' and 'target', see kd_lightning.contracts.EvalOutput); got NoneType.
    """
    if not (
        isinstance(outputs, dict)
        and isinstance(outputs.get("logits"), Tensor)
        and isinstance(outputs.get("target"), Tensor)
    ):
        raise TypeError(
            f"{reader} reads the EvalOutput that `{type(module).__name__}.validation_step` returns (a dict "
            "with tensors 'logits' and 'target', see kd_lightning.contracts.EvalOutput); "
            f"got {type(outputs).__name__}."
        )
