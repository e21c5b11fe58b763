"""Grouping classes by a class-by-class matrix: spectral clustering or the paper's k-means, with bounds.

:func:`cluster_classes` embeds the classes with a :class:`Grouping` (:class:`SpectralGrouping`, the
default: it recovers groups of uneven sizes, or the paper's :class:`KMeansGrouping` on the matrix's
columns), runs k-means, then an exact assignment that respects bounds on the group sizes
(:func:`bounded_assignment`), and optionally makes the groups overlap (each class in its ``overlap``
nearest groups). The helpers after it post-process a partition (drop small or repeated groups, label
vectors for scoring).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor


class Grouping(ABC):
    """How classes are embedded before k-means: one feature row per class.

    :class:`SpectralGrouping` is the default; :class:`KMeansGrouping` is the paper's choice.

    Args:
        n_init: k-means restarts (the best inertia is kept).
        seed: seed of k-means.
    """

    def __init__(self, n_init: int = 10, seed: int = 0) -> None:
        if not (isinstance(n_init, int) and n_init >= 1):
            raise ValueError(f"`n_init` must be a positive integer, got {n_init!r}.")
        self.n_init = n_init
        self.seed = seed

    @abstractmethod
    def features(self, matrix: np.ndarray, num_groups: int) -> np.ndarray:
        """``(C, d)`` features of the ``C`` classes of the ``(C, C)`` ``matrix``."""

    def describe(self) -> dict[str, Any]:
        return {"grouping": type(self).__name__, "n_init": self.n_init, "seed": self.seed}


class KMeansGrouping(Grouping):
    """k-means on the columns of the matrix, as in the paper: class ``j`` is the point ``matrix[:, j]``.

    Two classes land together when they covary alike with every class, which is what being confused
    with the same classes means.

    When it is the right choice: to reproduce the paper's method as written; when the groups are of
    similar sizes (it recovers planted groups of equal size exactly, e.g. 50 classes in 10 groups of
    5); and for very large label spaces, where its cost (``O(C^2 K)`` per k-means iteration) is far
    below the ``O(C^3)`` eigendecomposition of :class:`SpectralGrouping`. It is not the default because
    k-means favours clusters of similar spread: on uneven hierarchies it splits large groups and
    merges small ones. On planted hierarchies (:func:`kd_lightning.planted.planted_hierarchy`, a
    simulated generalist 80% accurate) of 100 classes in 12 groups of 3 to 15 classes its adjusted
    Rand index is 0.89 to 1.0 depending on the seed, with groups of 1 to 20 classes 0.69 to 0.91,
    where :class:`SpectralGrouping` gets 1.0 on every seed (``scripts/benchmark_specialists.py
    --ari-only`` prints the table).

    Args:
        normalize: scale each column to unit length first (k-means on directions, not sizes). A
            confidently predicted class has a large variance on the diagonal and little else, so with
            tens of classes the raw columns cluster by confidence rather than by confusion (on the
            50-class synthetic data, raw covariance columns give an adjusted Rand index of 0.06-0.2
            against the planted groups once the generalist fits its training set, unit columns 1.0).
            With the paper's 15,000 classes one diagonal entry is drowned by 300 group entries, and
            the two agree. ``False`` is the paper's literal choice.
        n_init: k-means restarts.
        seed: k-means seed.
    """

    def __init__(self, normalize: bool = True, n_init: int = 10, seed: int = 0) -> None:
        super().__init__(n_init, seed)
        self.normalize = normalize

    def features(self, matrix: np.ndarray, num_groups: int) -> np.ndarray:
        columns = matrix.T.copy()
        if self.normalize:
            columns /= np.maximum(np.linalg.norm(columns, axis=1, keepdims=True), 1e-12)
        return columns

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "normalize": self.normalize}


class SpectralGrouping(Grouping):
    """Spectral clustering of the matrix read as an affinity graph between classes: the default.

    The graph is :func:`class_affinity` of the matrix (symmetrised, the closure bias of a covariance of
    probabilities removed, negative entries clipped to 0, the diagonal kept as each class's
    self-affinity). The classes are embedded with the ``K`` leading eigenvectors of the normalised
    affinity ``D^-1/2 A D^-1/2`` (``D`` the degrees), scaled back by ``D^-1/2`` (the random-walk
    embedding, as :func:`sklearn.manifold.spectral_embedding` gives), and k-means runs in that
    embedding. The eigenvectors come from a dense symmetric eigensolver (:func:`scipy.linalg.eigh`,
    ``O(C^3)``: 0.2 s for 1,000 classes and 1.2 s for 2,000 on one core, so about ten minutes for the
    paper's 15,000; once per clustering), which
    neither depends on a random start nor can fail to converge; k-means distances do not change under
    the rotations or sign flips that differ between LAPACK builds within the ``K``-dimensional
    eigenspace.

    Why it is the default: a group of the graph is a set of classes more confused with each other than
    with the rest, whatever its size. k-means on the matrix's columns (:class:`KMeansGrouping`) prefers
    groups of similar spread, so it splits large groups and merges small ones: on planted hierarchies
    of 100 classes in 12 groups of 3 to 15 (:func:`kd_lightning.planted.planted_hierarchy`, a simulated
    generalist 80% accurate) it reaches an adjusted Rand index of 0.89 to 1.0 depending on the seed,
    this 1.0 on every seed (10 seeds), and 0.96 or more where the generalist is 60% accurate with half
    its errors outside the true group (``scripts/benchmark_specialists.py --ari-only``). Keeping the
    diagonal and removing the closure bias (:func:`class_affinity`) is what makes it hold with groups
    of one class and with ten-odd classes, where clipping the raw covariance loses every edge.

    Args:
        closure: remove the closure bias (see :func:`class_affinity`); without it a covariance of
            ten-odd classes has every off-diagonal entry negative and the clipped graph is empty.
        n_init: k-means restarts in the embedding.
        seed: k-means seed.
    """

    def __init__(self, closure: bool = True, n_init: int = 10, seed: int = 0) -> None:
        super().__init__(n_init, seed)
        self.closure = closure

    def features(self, matrix: np.ndarray, num_groups: int) -> np.ndarray:
        from scipy.linalg import eigh

        affinity = class_affinity(matrix, self.closure)
        # A class with no affinity at all would make the degree matrix singular: a tiny uniform floor
        # keeps every degree positive without changing which edges dominate.
        affinity += 1e-9 * max(float(affinity.max()), 1e-12)
        scale = 1.0 / np.sqrt(affinity.sum(1))
        normalised = affinity * scale[:, None] * scale[None, :]
        num_classes = matrix.shape[0]
        _, vectors = eigh(normalised, subset_by_index=[num_classes - num_groups, num_classes - 1])
        return vectors * scale[:, None]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "closure": self.closure}


def class_affinity(matrix: np.ndarray, closure: bool = True) -> np.ndarray:
    """The affinity graph between classes that :class:`SpectralGrouping` clusters.

    ``A = max(0, S + closure * v v^T / sum(v))`` off the diagonal and ``max(0, v)`` on it, where
    ``S = (matrix + matrix^T) / 2`` and ``v = diag(S)``. The middle term is the closure bias of a
    covariance of probabilities: they sum to one, so two classes covary negatively even when nothing
    confuses them (under a Dirichlet model with no structure ``cov(i, j) = -v_i v_j / sum(v)`` up to
    ``O(1/C)``), by an amount that dominates the confusions when there are few classes. Adding it back
    leaves what is beyond chance. On a confusion matrix it is a near-uniform floor of about
    ``accuracy / C``, which regularises the graph and does not change which edges dominate. The
    diagonal (each class's variance, or accuracy) stays: it keeps a class confused with nothing a
    component of its own rather than a node whose few noisy edges decide its group.

    Args:
        matrix: ``(C, C)`` matrix, e.g. :func:`~kd_lightning.clustering.matrices.prediction_covariance`.
        closure: add the closure term.

    Returns:
        ``(C, C)`` symmetric non-negative fp64 array.

    Example:
        >>> import torch
        >>> from kd_lightning.clustering.matrices import prediction_covariance
        >>> p = torch.tensor([[0.6, 0.4, 0, 0], [0.4, 0.6, 0, 0], [0, 0, 0.6, 0.4], [0, 0, 0.4, 0.6]])
        >>> (class_affinity(prediction_covariance(p).numpy()) > 0).astype(int).tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    s = (np.asarray(matrix, dtype=np.float64) + np.asarray(matrix, dtype=np.float64).T) / 2
    diagonal = np.clip(np.diag(s), 0.0, None)
    if closure and diagonal.sum() > 0:
        s = s + np.outer(diagonal, diagonal) / diagonal.sum()
    affinity = np.clip(s, 0.0, None)
    np.fill_diagonal(affinity, diagonal)
    return affinity


def _squared_distances(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((features[:, None, :] - centres[None, :, :]) ** 2).sum(-1)


def bounded_assignment(distances: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Assign each class to one group, minimising the total distance, with every group's size in bounds.

    Exact: a linear assignment of the ``C`` classes to ``max_size`` slots per group, where the first
    ``min_size`` slots of each group carry a bonus larger than any saving elsewhere, so every group's
    compulsory slots are filled first. Solved with :func:`scipy.optimize.linear_sum_assignment`; when
    the nearest-group assignment already satisfies the bounds it is returned as is.

    Args:
        distances: ``(C, K)`` distance of each class to each group.
        min_size: least classes per group.
        max_size: most classes per group.

    Returns:
        ``(C,)`` group id of each class.

    Raises:
        ValueError: the bounds cannot hold (``K * min_size > C`` or ``K * max_size < C``).

    Example:
        >>> d = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
        >>> bounded_assignment(d, 0, 3).tolist(), np.bincount(bounded_assignment(d, 1, 2)).tolist()
        ([0, 0, 0], [2, 1])
    """
    from scipy.optimize import linear_sum_assignment

    num_classes, num_groups = distances.shape
    if not num_groups * min_size <= num_classes <= num_groups * max_size:
        raise ValueError(
            f"group size bounds cannot hold: {num_groups} groups of {min_size} to {max_size} classes "
            f"(`min_size`, `max_size`) cannot cover {num_classes} classes."
        )
    nearest = distances.argmin(1)
    sizes = np.bincount(nearest, minlength=num_groups)
    if sizes.min() >= min_size and sizes.max() <= max_size:
        return nearest
    spread = float(distances.max() - distances.min()) + 1.0
    bonus = spread * (num_classes + 1)
    cost = np.repeat(distances, max_size, axis=1)  # column k * max_size + s: slot s of group k
    compulsory = (np.arange(num_groups * max_size) % max_size) < min_size
    cost[:, compulsory] -= bonus
    _, columns = linear_sum_assignment(cost)
    return columns // max_size


def cluster_classes(
    matrix: Tensor | np.ndarray,
    num_groups: int,
    method: Grouping | None = None,
    min_size: int = 1,
    max_size: int | None = None,
    overlap: int = 1,
    max_iter: int = 100,
    overlap_threshold: float | None = None,
) -> list[list[int]]:
    """Cluster the ``C`` classes of a ``(C, C)`` matrix into ``num_groups`` groups.

    k-means (sklearn, ``n_init`` restarts) on the features of ``method`` gives the centres; the classes
    are then assigned with :func:`bounded_assignment` and the centres recomputed until the assignment
    stops changing (constrained k-means, Bradley, Bennett & Demiriz 2000). Without binding bounds this is
    plain k-means. With ``overlap = m > 1`` each class also joins ``m - 1`` more groups, the nearest
    ones that fit (an exact assignment minimising the total distance with no group past ``max_size``),
    as the paper's groups may overlap; ``min_size`` bounds the groups before they gain these members.
    With ``overlap_threshold = r`` a class joins *at most* ``m - 1`` more groups, and only groups it is
    confused with: its mean affinity (:func:`class_affinity`) to the group's members must be at least
    ``r`` times its mean affinity to the other members of its own group. Classes at a group's border then
    belong to two or three groups and classes deep inside one to a single group, so the number of
    specialists covering a class varies, as in the paper's Table 4.

    Args:
        matrix: ``(C, C)`` matrix, e.g. :func:`~kd_lightning.clustering.matrices.prediction_covariance`.
        num_groups: ``K``, the number of groups.
        method: :class:`SpectralGrouping` (default) or :class:`KMeansGrouping` (the paper's).
        min_size: least classes per group (1 forbids empty groups).
        max_size: most classes per group (``None``: no bound).
        overlap: number of groups each class belongs to; below ``num_groups`` when there are several
            groups (with ``overlap == num_groups`` every group would hold every class).
        max_iter: cap on the constrained k-means iterations.
        overlap_threshold: ``r > 0``: further memberships only where the class is confused with the
            group (see above); ``None``: every class joins exactly ``overlap - 1`` more groups.

    Returns:
        ``K`` sorted lists of class ids, ordered by their smallest member.

    Raises:
        ValueError: a bad ``num_groups``, ``overlap`` or size bound (the message names it).

    Example:
        >>> block = np.kron(np.eye(2), np.ones((2, 2)))  # classes {0, 1} and {2, 3} covary
        >>> cluster_classes(block, 2)
        [[0, 1], [2, 3]]
    """
    from sklearn.cluster import KMeans

    method = method if method is not None else SpectralGrouping()
    m = matrix.detach().cpu().double().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"`matrix` must be square (C, C) with C >= 2, got shape {m.shape}.")
    if not np.isfinite(m).all():
        raise ValueError("`matrix` has non-finite entries (NaN or inf).")
    num_classes = m.shape[0]
    if not (isinstance(num_groups, int) and 1 <= num_groups <= num_classes):
        raise ValueError(f"`num_groups` must be an integer in [1, {num_classes}], got {num_groups!r}.")
    if not (isinstance(overlap, int) and 1 <= overlap <= max(1, num_groups - 1)):
        raise ValueError(
            f"`overlap` must be an integer in [1, num_groups - 1 = {max(1, num_groups - 1)}], got {overlap!r}: "
            "with every class in every group the groups would all be equal."
        )
    max_size = num_classes if max_size is None else max_size
    if not (isinstance(min_size, int) and min_size >= 0):
        raise ValueError(f"`min_size` must be an integer >= 0, got {min_size!r}.")
    if not (isinstance(max_size, int) and max_size >= max(min_size, 1)):
        raise ValueError(
            f"`max_size` must be an integer >= max(min_size, 1) = {max(min_size, 1)}, got {max_size!r}."
        )
    if overlap_threshold is not None and not (
        isinstance(overlap_threshold, (int, float)) and 0 < overlap_threshold < float("inf")
    ):
        raise ValueError(f"`overlap_threshold` must be a positive number or None, got {overlap_threshold!r}.")
    if overlap_threshold is None and num_classes * overlap > num_groups * max_size:
        raise ValueError(
            f"`max_size`={max_size} is too small: {num_groups} groups cannot hold {num_classes} classes "
            f"{overlap} times each (`overlap`)."
        )

    features = method.features(m, num_groups)
    kmeans = KMeans(num_groups, n_init=method.n_init, random_state=method.seed).fit(features)
    centres = kmeans.cluster_centers_
    assign = None
    for _ in range(max_iter):
        new = bounded_assignment(_squared_distances(features, centres), min_size, max_size)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centres = np.stack(
            [features[assign == k].mean(0) if (assign == k).any() else centres[k] for k in range(num_groups)]
        )
    assert assign is not None
    members = [set(np.flatnonzero(assign == k).tolist()) for k in range(num_groups)]
    if overlap > 1:
        affinity = class_affinity(m)
        costs = confusion_costs(affinity, members)
        eligible = None
        if overlap_threshold is not None:
            eligible = confused_groups(affinity, members, assign, overlap_threshold)
        _add_overlap(members, costs, assign, overlap, max_size, eligible)
    groups = [sorted(g) for g in members]
    return sorted(groups, key=lambda g: (g[0] if g else num_classes, len(g)))


def confusion_costs(affinity: np.ndarray, members: Sequence[set[int]]) -> np.ndarray:
    """``(C, K)`` cost of class ``c`` joining group ``k``: minus its mean affinity to the group's members.

    A class joins, as a second membership, the groups whose classes it is most confused with (the
    affinity is :func:`class_affinity`: what is beyond chance in the matrix). An empty group costs 0.

    Example:
        >>> a = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.0], [0.1, 0.0, 1.0]])
        >>> confusion_costs(a, [{0, 1}, {2}]).round(2).tolist()
        [[-0.75, -0.1], [-0.75, -0.0], [-0.05, -1.0]]
    """
    costs = np.zeros((affinity.shape[0], len(members)))
    for k, group in enumerate(members):
        if group:
            costs[:, k] = -affinity[:, sorted(group)].mean(1)
    return costs


def confused_groups(
    affinity: np.ndarray, members: Sequence[set[int]], assign: np.ndarray, threshold: float
) -> np.ndarray:
    """``(C, K)`` bool: the groups a class may join as a further membership under ``overlap_threshold``.

    Class ``c`` may join group ``k`` (not its own) when its mean affinity to ``k``'s members is positive
    and at least ``threshold`` times its mean affinity to the other members of its own group ``assign[c]``
    (its own affinity to itself left out; a class alone in its group compares with its own diagonal).

    Example:
        >>> a = np.array([[1.0, 0.5, 0.3, 0.0], [0.5, 1.0, 0.0, 0.0], [0.3, 0.0, 1.0, 0.6], [0.0, 0.0, 0.6, 1.0]])
        >>> confused_groups(a, [{0, 1}, {2, 3}], np.array([0, 0, 1, 1]), 0.25).astype(int).tolist()
        [[0, 1], [0, 0], [1, 0], [0, 0]]
    """
    num_classes = affinity.shape[0]
    mean = np.zeros((num_classes, len(members)))
    for k, group in enumerate(members):
        if group:
            mean[:, k] = affinity[:, sorted(group)].mean(1)
    own = np.empty(num_classes)
    for c in range(num_classes):
        others = sorted(members[int(assign[c])] - {c})
        own[c] = affinity[c, others].mean() if others else affinity[c, c]
    eligible = (mean > 0) & (mean >= threshold * own[:, None])
    eligible[np.arange(num_classes), assign] = False
    return eligible


def _add_overlap(
    members: list[set[int]],
    costs: np.ndarray,
    assign: np.ndarray,
    overlap: int,
    max_size: int,
    eligible: np.ndarray | None = None,
) -> None:
    """Give each class ``overlap - 1`` more groups besides its own (with ``eligible``, at most that many,
    among its eligible groups), minimising the total cost, with no group past ``max_size`` and no two
    groups made equal.

    A small integer program (``scipy.optimize.milp``): a b-matching of classes to groups, plus, for each
    pair of groups ``a, b``, that not every class of ``a`` joins ``b`` while every class of ``b`` joins
    ``a``. Two extended groups are equal exactly when that happens (each then holds both), so the
    constraint keeps them distinct and excludes nothing else.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    num_classes, num_groups = costs.shape
    upper = np.ones((num_classes, num_groups))
    upper[np.arange(num_classes), assign] = 0.0  # its own group already holds it
    if eligible is not None:
        upper[~eligible] = 0.0
    rows = np.repeat(np.arange(num_classes), num_groups)
    per_class = sparse.csr_matrix(
        (np.ones(rows.size), (rows, np.arange(rows.size))), (num_classes, rows.size)
    )
    cols = np.tile(np.arange(num_groups), num_classes)
    per_group = sparse.csr_matrix((np.ones(cols.size), (cols, np.arange(cols.size))), (num_groups, cols.size))
    room = np.array([max_size - len(m) for m in members], dtype=float)
    constraints = [
        LinearConstraint(per_class, 0 if eligible is not None else overlap - 1, overlap - 1),
        LinearConstraint(per_group, 0, room),
    ]
    pairs = [(a, b) for a in range(num_groups) for b in range(a + 1, num_groups)]
    if pairs:
        # Row of pair (a, b): x[c, b] for c in group a, plus x[d, a] for d in group b, at most |a| + |b| - 1.
        entries = [
            (row, c * num_groups + other)
            for row, (a, b) in enumerate(pairs)
            for own, other in ((a, b), (b, a))
            for c in members[own]
        ]
        r, col = np.array(entries).T
        swap = sparse.csr_matrix((np.ones(r.size), (r, col)), (len(pairs), rows.size))
        sizes = np.array([len(members[a]) + len(members[b]) - 1 for a, b in pairs], dtype=float)
        constraints.append(LinearConstraint(swap, 0, sizes))
    result = milp(
        costs.ravel(),
        constraints=constraints,
        integrality=np.ones(rows.size),
        bounds=Bounds(0, upper.ravel()),
    )
    if not result.success:
        raise ValueError(
            f"`overlap`={overlap} with `max_size`={max_size}: the classes cannot each join {overlap - 1} more "
            f"groups while the groups stay distinct ({result.message})."
        )
    chosen = np.flatnonzero(np.round(result.x) > 0)
    for c, k in zip(*np.divmod(chosen, num_groups), strict=True):
        members[int(k)].add(int(c))


def drop_small_groups(groups: Sequence[Sequence[int]], min_size: int) -> list[list[int]]:
    """The groups with at least ``min_size`` classes (a one-class specialist only re-learns a yes/no
    decision the generalist already makes; its classes are left to the generalist).

    Example:
        >>> drop_small_groups([[0, 1], [2], [3, 4, 5]], 2)
        [[0, 1], [3, 4, 5]]
    """
    return [list(g) for g in groups if len(g) >= min_size]


def drop_duplicate_groups(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The groups without repeats of the same class set (first kept). With ``overlap`` > 1 two groups can
    each take the other's classes as second memberships and end up equal: one specialist would do.

    Example:
        >>> drop_duplicate_groups([[0, 1, 2], [3, 4], [2, 1, 0]])
        [[0, 1, 2], [3, 4]]
    """
    seen: set[tuple[int, ...]] = set()
    kept = []
    for g in groups:
        key = tuple(sorted(g))
        if key not in seen:
            seen.add(key)
            kept.append(list(g))
    return kept


def groups_to_labels(groups: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Label vector of a partition (each class's first group; ``-1`` where a class is in no group).

    Example:
        >>> groups_to_labels([[2, 0], [1]], 4).tolist()
        [0, 1, 0, -1]
    """
    labels = np.full(num_classes, -1)
    for g, members in enumerate(groups):
        for c in members:
            if labels[c] < 0:
                labels[c] = g
    return labels
