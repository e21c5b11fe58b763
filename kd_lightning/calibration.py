"""Calibration: the one expected calibration error of the package, and the bins of a reliability diagram.

The ECE is torchmetrics' top-label calibration error (L1, ``n_bins`` equal-width confidence bins,
default 15): :func:`calibration_error` makes the metric (for state accumulated over batches and
processes), :func:`expected_calibration_error` applies it to one set of predictions. The dashboard,
the ensemble's evaluation and report and the reliability diagrams all take the number from here.

The picture needs more than the number: each bin's sample count, mean confidence and accuracy.
:class:`ConfidenceBins` accumulates them (summed over processes) and returns :class:`ReliabilityBins`;
it uses the bin boundaries torchmetrics uses, except that a confidence of exactly 1 stays in the last
of the ``n_bins`` bins (torchmetrics gives it a bin of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError

ECE_BINS = 15


def calibration_error(num_classes: int, n_bins: int = ECE_BINS) -> MulticlassCalibrationError:
    """The ECE metric of the package: top-label, L1, ``n_bins`` equal-width bins (torchmetrics).

    It takes probabilities ``(N, C)`` (or logits, which it softmaxes) and labels ``(N,)``.
    """
    return MulticlassCalibrationError(num_classes, n_bins=n_bins, norm="l1")


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (L1, ``n_bins`` equal-width confidence bins) of predicted probabilities ``(N, C)``.

    ``sum_b n_b / N * |acc_b - conf_b|`` over the bins ``b``, with ``n_b`` samples, mean top-1
    confidence ``conf_b`` and share of correct top-1 predictions ``acc_b``; torchmetrics computes it
    in fp32.

    Raises:
        ValueError: ``probs`` is not ``(N, C)`` with ``C >= 2``, or ``target`` is not ``(N,)``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.12, 0.88]])  # one bin, mean confidence 0.89
        >>> round(expected_calibration_error(probs, torch.tensor([0, 0])), 4)  # one of two right: |0.5 - 0.89|
        0.39
    """
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"`probs` must be (num_samples, num_classes >= 2), got {tuple(probs.shape)}.")
    if target.shape != probs.shape[:1]:
        raise ValueError(f"`target` must have shape ({probs.shape[0]},), got {tuple(target.shape)}.")
    metric = calibration_error(probs.shape[1], n_bins).to(probs.device)
    return float(metric(probs, target))


@dataclass
class ReliabilityBins:
    """A reliability diagram's data: per equal-width confidence bin, how many samples, how confident,
    how accurate.

    Args:
        counts: ``(B,)`` samples per bin (equal-width bins over ``[0, 1]``).
        confidence: ``(B,)`` mean confidence in each bin (``nan`` where empty).
        accuracy: ``(B,)`` share of correct top-1 predictions in each bin (``nan`` where empty).
    """

    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def from_sums(
        cls,
        counts: Tensor | np.ndarray,
        confidence_sums: Tensor | np.ndarray,
        correct_sums: Tensor | np.ndarray,
    ) -> ReliabilityBins:
        """From per-bin counts and sums of confidences and of correct predictions (what DDP can sum).

        Example:
            >>> b = ReliabilityBins.from_sums(np.array([0, 2]), np.array([0, 1.0]), np.array([0, 1]))
            >>> b.confidence.tolist(), b.accuracy.tolist()
            ([nan, 0.5], [nan, 0.5])
        """
        n, conf, correct = _numpy(counts), _numpy(confidence_sums), _numpy(correct_sums)
        with np.errstate(invalid="ignore", divide="ignore"):
            return cls(n, np.where(n > 0, conf / n, np.nan), np.where(n > 0, correct / n, np.nan))


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)


class ConfidenceBins(Metric):
    """Per confidence bin: samples, sum of top-1 confidences and of correct predictions (summed over ranks).

    Bin ``b`` holds the confidences in ``[b / n_bins, (b + 1) / n_bins)`` (torchmetrics' boundaries);
    a confidence of 1 goes to the last bin. Sums are kept in float64.

    Example:
        >>> bins = ConfidenceBins(2)
        >>> bins.update(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), torch.tensor([0, 0, 0]))
        >>> b = bins.compute()
        >>> b.counts.tolist(), b.confidence.round(4).tolist(), b.accuracy.round(4).tolist()
        ([0.0, 3.0], [nan, 0.7333], [nan, 0.6667])
    """

    full_state_update = False

    def __init__(self, n_bins: int = ECE_BINS) -> None:
        super().__init__()
        if not (isinstance(n_bins, int) and n_bins >= 1):
            raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
        self.n_bins = n_bins
        for name in ("counts", "confidence_sums", "correct_sums"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        confidence, predicted = probs.max(-1)
        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=confidence.dtype, device=confidence.device)
        bins = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp_(0, self.n_bins - 1)
        self.counts += torch.bincount(bins, minlength=self.n_bins).double()
        self.confidence_sums += torch.bincount(bins, confidence.double(), minlength=self.n_bins)
        self.correct_sums += torch.bincount(bins, (predicted == target).double(), minlength=self.n_bins)

    def compute(self) -> ReliabilityBins:
        return ReliabilityBins.from_sums(self.counts, self.confidence_sums, self.correct_sums)
