"""Calibration: the ECE and the reliability bins against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning.calibration import (
    ConfidenceBins,
    ReliabilityBins,
    calibration_error,
    expected_calibration_error,
)

EPS32 = torch.finfo(torch.float32).eps

# Four samples, two classes, all labelled 0. Top-1 confidences 0.55 (right), 0.7 (wrong), 0.95 (right)
# and 0.95 (wrong): with 15 bins of width 1/15 they fall in bins 8, 10 and 14 (twice), far from any edge.
PROBS = torch.tensor([[0.55, 0.45], [0.3, 0.7], [0.95, 0.05], [0.05, 0.95]], dtype=torch.float64)
TARGET = torch.zeros(4, dtype=torch.long)
# sum_b n_b / N * |acc_b - conf_b|
ECE_15 = 0.25 * abs(1 - 0.55) + 0.25 * abs(0 - 0.7) + 0.5 * abs(0.5 - 0.95)  # 0.5125
ECE_1 = abs(2 / 4 - (0.55 + 0.7 + 0.95 + 0.95) / 4)  # one bin: accuracy against mean confidence
# torchmetrics works in fp32: each confidence rounded once, each bin's mean and the weighted sum a few
# roundings more, all of values <= 1.
TOL = 8 * EPS32


def test_ece_by_hand():
    assert math.isclose(ECE_15, 0.5125, rel_tol=0, abs_tol=1e-15)
    assert expected_calibration_error(PROBS, TARGET) == pytest.approx(ECE_15, rel=0, abs=TOL)
    assert expected_calibration_error(PROBS, TARGET, n_bins=1) == pytest.approx(ECE_1, rel=0, abs=TOL)


def test_ece_metric_accumulates_batches_to_the_same_value():
    metric = calibration_error(2)
    metric.update(PROBS[:2], TARGET[:2])
    metric.update(PROBS[2:], TARGET[2:])
    assert float(metric.compute()) == pytest.approx(ECE_15, rel=0, abs=TOL)


def test_ece_rejects_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(torch.ones(4), TARGET)
    with pytest.raises(ValueError, match="target"):
        expected_calibration_error(PROBS, TARGET[:3])


def test_confidence_bins_by_hand():
    bins = ConfidenceBins(15)
    bins.update(PROBS[:2], TARGET[:2])
    bins.update(PROBS[2:], TARGET[2:])
    bins.update(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0]))  # 1 is in the last bin
    b = bins.compute()
    filled = {8: (1, 0.55, 1.0), 10: (1, 0.7, 0.0), 14: (3, (0.95 + 0.95 + 1.0) / 3, 2 / 3)}
    for k in range(15):
        if k in filled:
            n, conf, acc = filled[k]
            assert (b.counts[k], b.confidence[k], b.accuracy[k]) == pytest.approx(
                (n, conf, acc), abs=1e-15
            ), k
        else:
            assert b.counts[k] == 0 and math.isnan(b.confidence[k]) and math.isnan(b.accuracy[k]), k
    with pytest.raises(ValueError, match="n_bins"):
        ConfidenceBins(0)


def test_reliability_bins_from_sums():
    bins = ReliabilityBins.from_sums(np.array([0, 2, 8]), np.array([0, 1.0, 7.2]), np.array([0, 1, 6]))
    assert bins.counts.tolist() == [0, 2, 8]
    assert math.isnan(bins.confidence[0]) and math.isnan(bins.accuracy[0])
    assert bins.confidence[1:].tolist() == pytest.approx([0.5, 0.9]) and bins.accuracy[1:].tolist() == [
        0.5,
        0.75,
    ]
