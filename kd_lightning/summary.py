"""Summaries of results over seeds, as the benchmark and reproduction scripts print them, and the
``kd summary`` workflow over finished stages."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def summarize(
    results: Sequence[str | Path],
    metric: str = "test/acc",
    scale: float = 100.0,
    digits: int = 2,
    sample: bool = True,
) -> dict[str, Any]:
    """Mean ± std of one test metric over finished stages (e.g. the seeds of one run).

    Args:
        results: stage records (``result.json`` beside a stage's checkpoint), or directories searched for
            them recursively.
        metric: the test metric, as recorded (``test/acc``, ``test/nll``, ...).
        scale: factor applied before printing (100: accuracies in %).
        digits: decimals printed.
        sample: the sample standard deviation (else the population one); see :func:`mean_std`.

    Returns:
        ``{"metric", "runs" (the records read), "values", "mean_std"}``.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no ``result.json``.
        KeyError: a record has no such metric.
    """
    files: list[Path] = []
    for given in results:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.rglob("result.json"))
            if not found:
                raise FileNotFoundError(f"`results`: no result.json under {str(path)!r}.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"`results`: no file or directory at {str(path)!r}.")
    values = []
    for file in files:
        metrics = json.loads(file.read_text()).get("metrics", {})
        if metric not in metrics:
            raise KeyError(f"`metric` {metric!r}: not recorded in {file} (it has {sorted(metrics)}).")
        values.append(float(metrics[metric]))
    return {
        "metric": metric,
        "runs": [str(f) for f in files],
        "values": values,
        "mean_std": mean_std(values, scale, digits, sample),
    }
