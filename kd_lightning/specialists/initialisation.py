"""Initialising a specialist from the generalist (Hinton, Vinyals & Dean 2015, section 5.1).

**Head rule.** The *head* of a network is the layer it names as its ``head_name``
(:class:`~kd_lightning.contracts.ClassifierHead`: :class:`~kd_lightning.models.TorchvisionNet` and
:class:`~kd_lightning.models.TimmNet` name their adapted classifier), else its last :class:`torch.nn.Linear`
in registration order (``net.modules()``), which must output the logits; the rule holds for every network
in :mod:`kd_lightning.models` and :mod:`kd_lightning.resnets`. A head is an ``nn.Linear`` or a 1x1
``nn.Conv2d`` (SqueezeNet), whose output channels are the logits. A specialist is initialised from the
generalist by copying every parameter and buffer except the head's, then the head's rows of the group's
classes; its dustbin row starts as the mean of the other rows with ``log(#others)`` added to the bias, a
first guess at the log-sum-exp of the other classes' logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.contracts import ClassifierHead

Head = nn.Linear | nn.Conv2d


def head_layer(net: nn.Module) -> tuple[str, Head]:
    """The network's head under this module's rule: the layer its ``head_name`` names, else its last
    :class:`~torch.nn.Linear` in ``modules()`` order; returned with its qualified name.

    Raises:
        ValueError: the network has no ``nn.Linear``, or its ``head_name`` is not an ``nn.Linear`` or
            ``nn.Conv2d``.

    Example:
        >>> head_layer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))[0]
        '2'
    """
    if isinstance(net, ClassifierHead):
        layer = net.get_submodule(net.head_name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"{type(net).__name__}.head_name={net.head_name!r} names a {type(layer).__name__}; a head is "
                "an nn.Linear or a 1x1 nn.Conv2d that outputs the logits."
            )
        return net.head_name, layer
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(
            f"{type(net).__name__} has no nn.Linear: a specialist's head is the network's last nn.Linear, "
            "which must output the logits."
        )
    return found


def head_outputs(head: Head) -> int:
    """Number of logits a head outputs: ``out_features`` of an ``nn.Linear``, ``out_channels`` of a conv.

    Example:
        >>> head_outputs(nn.Linear(4, 3)), head_outputs(nn.Conv2d(8, 5, 1))
        (3, 5)
    """
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


@torch.no_grad()
def init_from_generalist(specialist: nn.Module, generalist: nn.Module, classes: Sequence[int]) -> None:
    """Copy the generalist into the specialist: every weight and buffer, and the head's group rows.

    The two networks must be the same architecture except for the head's number of outputs (``C``
    for the generalist, ``G + 1`` for the specialist). Before any training, the specialist's group
    logits equal the generalist's logits of those classes. A specialist of another architecture (e.g.
    a smaller one) starts from scratch instead (``SpecialistModule(init_from="scratch")``).

    Raises:
        ValueError: the heads do not have the expected sizes, or the architectures differ elsewhere (the
            message names the parameters and their shapes).

    Example:
        >>> generalist = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
        >>> smaller = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
        >>> init_from_generalist(smaller, generalist, [0, 1])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ... different shapes ['0.bias (specialist (2,), generalist (8,))', '0.weight (specialist (2, 4), generalist (8, 4))'].

    """
    classes = list(classes)
    s_name, s_head = head_layer(specialist)
    g_name, g_head = head_layer(generalist)
    if head_outputs(s_head) != len(classes) + 1:
        raise ValueError(
            f"the specialist's head ({s_name!r}) outputs {head_outputs(s_head)} logits, "
            f"expected {len(classes) + 1} (a group of {len(classes)} classes plus the dustbin)."
        )
    num_classes = head_outputs(g_head)
    if max(classes) >= num_classes:
        raise ValueError(
            f"the group's classes {classes} do not fit the generalist's head, which outputs {num_classes} logits."
        )
    head_keys = {f"{s_name}.weight", f"{s_name}.bias"}
    state = {k: v for k, v in generalist.state_dict().items() if not k.startswith(f"{g_name}.")}
    target = specialist.state_dict()
    body = {k for k in target if k not in head_keys}
    if set(state) != body or any(state[k].shape != target[k].shape for k in body):
        missing, extra = sorted(body - set(state)), sorted(set(state) - body)
        shapes = [
            f"{k} (specialist {tuple(target[k].shape)}, generalist {tuple(state[k].shape)})"
            for k in sorted(body & set(state))
            if state[k].shape != target[k].shape
        ]
        raise ValueError(
            "the specialist's network must be the generalist's architecture with another head: "
            f"parameters the generalist lacks {missing[:5]}, generalist parameters the specialist lacks "
            f"{extra[:5]}, different shapes {shapes[:5]}."
        )
    specialist.load_state_dict({**target, **state})
    rows = torch.as_tensor(classes, dtype=torch.long, device=g_head.weight.device)
    rest = torch.ones(num_classes, dtype=torch.bool, device=g_head.weight.device)
    rest[rows] = False
    weight = torch.cat([g_head.weight[rows], g_head.weight[rest].mean(0, keepdim=True)])
    s_head.weight.copy_(weight)
    if s_head.bias is not None:
        g_bias = g_head.bias if g_head.bias is not None else torch.zeros(num_classes, device=weight.device)
        dust = g_bias[rest].mean() + math.log(int(rest.sum()))
        s_head.bias.copy_(torch.cat([g_bias[rows], dust.reshape(1)]))
