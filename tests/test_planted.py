"""kd_lightning.planted: uneven group sizes and a simulated generalist with the accuracy it is asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.planted import planted_hierarchy, uneven_group_sizes


@pytest.mark.parametrize(
    ("classes", "groups", "least", "most"), [(100, 12, 3, 15), (30, 5, 2, 10), (10, 4, 1, 4)]
)
@pytest.mark.parametrize("seed", range(5))
def test_group_sizes_are_in_bounds_with_both_extremes(classes, groups, least, most, seed):
    sizes = uneven_group_sizes(classes, groups, least, most, np.random.default_rng(seed))
    assert len(sizes) == groups and sum(sizes) == classes
    assert min(sizes) == least and max(sizes) == most


def test_group_sizes_are_uneven_and_seeded():
    draws = [uneven_group_sizes(100, 12, 3, 15, np.random.default_rng(s)) for s in range(5)]
    # Uneven: a spread of sizes, not a near-equal split of 100 into 12 (8 or 9 each).
    assert all(len(set(d)) >= 5 for d in draws)
    assert uneven_group_sizes(100, 12, 3, 15, np.random.default_rng(0)) == draws[0]
    assert len({tuple(d) for d in draws}) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((100, 12, 3, 5), r"`num_classes`=100 cannot be shared into 12 groups of 3 to 5"),
        ((10, 4, 3, 4), r"`num_classes`=10 cannot be shared into 4 groups of 3 to 4"),
        ((10, 0, 1, 4), r"`num_groups` must be an integer >= 1, got 0"),
        ((10, 4, 5, 4), r"`min_size`, `max_size` must be integers with 1 <= min_size <= max_size, got 5, 4"),
    ],
)
def test_group_sizes_that_cannot_hold(args, message):
    with pytest.raises(ValueError, match=message):
        uneven_group_sizes(*args, np.random.default_rng(0))


@pytest.mark.parametrize(("accuracy", "per_class"), [(0.8, 50), (0.63, 30), (1.0, 7), (0.0, 4)])
def test_accuracy_is_exactly_the_share_asked_for(accuracy, per_class):
    h = planted_hierarchy(40, 6, 2, 12, samples_per_class=per_class, accuracy=accuracy, seed=3)
    assert h.accuracy() == round(accuracy * per_class) / per_class
    # Every class has the same share right, not only the total.
    right = (h.probs.argmax(-1) == h.target).reshape(40, per_class).sum(1)
    assert (right == round(accuracy * per_class)).all()


def test_shapes_probabilities_and_groups():
    h = planted_hierarchy(30, 5, 2, 10, samples_per_class=20, seed=1)
    assert h.probs.shape == (600, 30) and h.probs.dtype == torch.float32
    assert (h.probs >= 0).all()
    sums = h.probs.double().sum(-1)
    # A float64 softmax rounded to fp32: each probability off by at most half an ulp of itself, so
    # the sum (1) by at most eps / 2, plus float64 rounding.
    assert (sums - 1).abs().max() <= torch.finfo(torch.float32).eps
    assert torch.equal(torch.bincount(h.target), torch.full((30,), 20))
    assert [len(g) for g in h.groups] == h.sizes
    assert sorted(c for g in h.groups for c in g) == list(range(30))
    # The groups are scattered over the class ids, not contiguous blocks.
    assert any(g != list(range(g[0], g[0] + len(g))) for g in h.groups)


def test_errors_stay_in_the_group_as_asked():
    def share_inside(within: float) -> float:
        h = planted_hierarchy(30, 5, 2, 10, samples_per_class=40, within_group=within, seed=2)
        pred = h.probs.argmax(-1).numpy()
        wrong = pred != h.target.numpy()
        return float((h.group_of[pred[wrong]] == h.group_of[h.target.numpy()[wrong]]).mean())

    assert share_inside(1.0) == 1.0  # no group of one class here: every error can stay inside
    assert share_inside(0.0) == 0.0
    # 240 errors drawn with p = 0.5: the share lies within 5 binomial standard deviations of 0.5.
    assert abs(share_inside(0.5) - 0.5) <= 5 * (0.25 / 240) ** 0.5


def test_same_seed_same_hierarchy():
    a, b = planted_hierarchy(seed=4), planted_hierarchy(seed=4)
    assert torch.equal(a.probs, b.probs) and np.array_equal(a.group_of, b.group_of)
    assert not np.array_equal(a.group_of, planted_hierarchy(seed=5).group_of)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accuracy": 1.5}, r"`accuracy` must lie in \[0, 1\], got 1.5"),
        ({"within_group": -0.1}, r"`within_group` must lie in \[0, 1\], got -0.1"),
        ({"noise": float("inf")}, r"`noise` must be a finite number >= 0, got inf"),
        ({"margin": -1.0}, r"`margin` must be a finite number >= 0, got -1.0"),
        ({"samples_per_class": 0}, r"`samples_per_class` must be an integer >= 1, got 0"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planted_hierarchy(**kwargs)
