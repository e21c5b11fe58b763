"""Summaries of results over seeds, as the benchmark and reproduction scripts print them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2, sample: bool = True) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (default: fractions printed as percentages).

    Args:
        values: one result per seed.
        scale: factor applied before printing (100: accuracies in [0, 1] printed in %).
        digits: decimals printed.
        sample: the sample standard deviation (``n - 1``; 0 for one value) if true, else the
            population one (``n``).

    Raises:
        ValueError: no values, or a negative ``digits``.

    Example:
        >>> mean_std([0.90, 0.92])
        '91.00 ± 1.41'
        >>> mean_std([0.90, 0.92], sample=False), mean_std([0.5])
        ('91.00 ± 1.00', '50.00 ± 0.00')
        >>> mean_std([671.0, 680.0], scale=1.0, digits=1)
        '675.5 ± 6.4'
    """
    if not values:
        raise ValueError("`values` must hold at least one result, got none.")
    if not (isinstance(digits, int) and digits >= 0):
        raise ValueError(f"`digits` must be a non-negative integer, got {digits!r}.")
    scaled = [scale * float(v) for v in values]
    # statistics.stdev needs two values; one seed has no spread.
    spread = statistics.pstdev(scaled) if not sample or len(scaled) == 1 else statistics.stdev(scaled)
    return f"{statistics.fmean(scaled):.{digits}f} ± {spread:.{digits}f}"
