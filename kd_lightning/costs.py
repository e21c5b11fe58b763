"""What a model costs at inference: FLOPs by PyTorch's own counter, and measured latency.

Example:
    >>> from torch import nn
    >>> forward_flops(nn.Linear(784, 10), (784,))  # one (1x784) @ (784x10) matmul: 2 * 784 * 10
    15680
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def forward_flops(net: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``net`` on one input, in eval mode, by ``torch.utils.flop_counter``.

    The counter counts matrix multiplications and convolutions (a multiply-add is 2 FLOPs); element-wise
    work (activations, normalisation) is not counted, which is the convention of published FLOP tables.

    Args:
        net: the network (or an ensemble: every member's forward is counted).
        input_shape: shape of one input, without the batch dimension.
    """
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, *input_shape, device=_device(net)))
    finally:
        net.train(was_training)
    return int(counter.get_total_flops())


def measure_latency(
    net: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 256,
    repeats: int = 20,
    warmup: int = 3,
    inputs: Tensor | None = None,
) -> float:
    """Median wall time in seconds of one eval-mode forward pass over a batch of ``batch_size`` inputs.

    The median of ``repeats`` timed passes after ``warmup`` untimed ones, so that one-off costs (memory
    allocation, kernel selection) and a busy neighbour's spikes do not count.

    Args:
        net: the network (or a system of networks) to time.
        input_shape: shape of one input, without the batch dimension.
        batch_size: inputs per pass (random normal ones).
        repeats: timed passes.
        warmup: untimed passes first.
        inputs: a batch to time instead of random inputs (``batch_size`` is then its size): for a model
            whose work depends on the input, such as a generalist that runs only the specialists its top
            class activates.

    Raises:
        ValueError: ``batch_size`` or ``repeats`` is not positive, or ``inputs`` are not a batch of
            ``input_shape``.

    Example:
        >>> measure_latency(nn.Linear(4, 2), (4,), batch_size=8, repeats=3) > 0
        True
    """
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"`batch_size` and `repeats` must be >= 1, got {batch_size} and {repeats}.")
    device = _device(net)
    if inputs is None:
        x = torch.randn(batch_size, *input_shape, device=device)
    elif tuple(inputs.shape[1:]) != tuple(input_shape) or inputs.shape[0] < 1:
        raise ValueError(
            f"`inputs` must be a batch of inputs of shape {tuple(input_shape)}, got shape {tuple(inputs.shape)}."
        )
    else:
        x = inputs.to(device)
    was_training = net.training
    net.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                net(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        net.train(was_training)
    return statistics.median(times)
