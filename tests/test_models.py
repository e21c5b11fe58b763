"""The small networks of kd_lightning.models (shapes are their doctests)."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.models import CNN1D


def test_cnn1d_maps_signals_to_logits_and_refuses_images():
    net = CNN1D((2, 37), 5, channels=4)  # an odd length: the head's width is measured, not computed
    assert net(torch.zeros(3, 2, 37)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"CNN1D needs `input_shape` \(C, L\), got \(1, 8, 8\)"):
        CNN1D((1, 8, 8), 10)
