"""kd_lightning.summary: the mean ± std the scripts print, against hand computation."""

from __future__ import annotations

import math

import pytest

from kd_lightning.summary import mean_std


def test_mean_std_against_hand_computation():
    values = [0.9012, 0.9047, 0.8991]
    mean = sum(values) / 3
    sample = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    population = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert mean_std(values) == f"{100 * mean:.2f} ± {100 * sample:.2f}"
    assert mean_std(values, sample=False) == f"{100 * mean:.2f} ± {100 * population:.2f}"
    assert mean_std(values, scale=1.0, digits=4) == f"{mean:.4f} ± {sample:.4f}"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="`values`"):
        mean_std([])
    with pytest.raises(ValueError, match="`digits`.*-1"):
        mean_std([0.5], digits=-1)
