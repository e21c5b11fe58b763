"""Figures, written as PNG files with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from kd_lightning.calibration import ReliabilityBins

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when drawing.

    Public for scripts that draw their own figures and save them with :func:`save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numpy(x: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)


def save_figure(
    fig: Figure,
    path: str | Path,
    loggers: Sequence[Any] = (),
    key: str | None = None,
    step: int | None = None,
    dpi: int = 100,
) -> Path:
    """Write ``fig`` as a PNG at ``path`` and log that same file to every W&B logger in ``loggers``.

    The one way every picture of this package is saved: a person without W&B finds in the run's
    directory exactly the images the W&B run shows. The file is written beside and renamed into place,
    so a reader never sees half a PNG; the figure is closed. A W&B error while logging the image is a
    warning (the PNG is on disk already), never an exception.

    Args:
        fig: a matplotlib figure.
        path: the PNG to write (parent directories are created).
        loggers: e.g. ``trainer.loggers``; those that are WandbLoggers get the image.
        key: W&B key of the image (default: the file name without suffix).
        step: W&B step (e.g. ``trainer.global_step``).
        dpi: resolution.

    Returns:
        ``path``.
    """
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    try:
        fig.tight_layout()
        fig.savefig(partial, dpi=dpi)
        partial.replace(path)
    finally:
        plt.close(fig)
    log_image(loggers, key or path.stem, path, step)
    return path


def log_image(loggers: Sequence[Any], key: str, path: str | Path, step: int | None = None) -> None:
    """Send the image file at ``path`` to every W&B logger in ``loggers`` (others are skipped).

    A W&B error is a warning: pictures never stop a run.
    """
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_warn

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        try:
            logger.log_image(key=key, images=[str(path)], step=step)
        except wandb.errors.Error as err:
            rank_zero_warn(
                f"W&B: logging the image {key!r} failed ({type(err).__name__}: {err}); {path} is on disk."
            )


def plot_class_groups(
    matrix: Tensor | np.ndarray,
    groups: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Heatmap of a class-by-class matrix with the specialists' groups marked.

    Classes are reordered so that each group's classes are adjacent (a class goes with the first group
    that holds it; classes of no group come last, under "generalist only"); a box marks each group's
    block. A strip on the right shows every group a class belongs to, so overlapping groups stay
    visible.

    Args:
        matrix: ``(C, C)``, e.g. the covariance of the predictions.
        groups: lists of class ids.
        class_names: ``C`` names.
        path: the PNG to write (parent directories are created).
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``matrix`` is not ``(C, C)`` for ``C = len(class_names)``.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    m = matrix.detach().cpu().double().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, float)
    c = len(class_names)
    if m.shape != (c, c):
        raise ValueError(f"`matrix` must be ({c}, {c}) for {c} class names, got {m.shape}.")
    order: list[int] = []
    blocks = []
    for members in groups:
        new = [x for x in members if x not in order]
        blocks.append((len(order), len(new)))
        order += new
    order += [x for x in range(c) if x not in order]
    m = m[np.ix_(order, order)]
    membership = np.zeros((c, max(len(groups), 1)))
    for k, members in enumerate(groups):
        for x in members:
            membership[order.index(x), k] = 1.0

    size = min(4 + 0.22 * c, 24)
    k = max(len(groups), 1)
    fig, (ax, strip) = plt.subplots(
        1, 2, figsize=(size * (1 + k / c) + 1.5, size + 0.5), gridspec_kw={"width_ratios": [c, k]}
    )
    # Diagonal entries (a class's own variance or accuracy) would swamp the colour scale.
    off = m[~np.eye(c, dtype=bool)]
    bound = float(np.abs(off).max()) if off.size else 1.0
    lower = -bound if (off < 0).any() else 0.0
    image = ax.imshow(m, cmap="RdBu_r" if lower < 0 else "viridis", vmin=lower, vmax=bound or 1.0)
    names = [class_names[x] for x in order]
    fontsize = max(4, min(9, int(400 / max(c, 1))))
    ax.set_xticks(range(c), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(c), names, fontsize=fontsize)
    for g, (start, length) in enumerate(blocks):
        if length:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), length, length, fill=False, lw=2, ec="black"))
            ax.text(
                start + 0.5 * length - 0.5,
                start + 0.5 * length - 0.5,
                f"g{g}",
                fontsize=fontsize + 2,
                ha="center",
                va="center",
                weight="bold",
                alpha=0.6,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    strip.imshow(membership, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    strip.set_xticks(range(len(groups)), [f"g{g}" for g in range(len(groups))], fontsize=fontsize)
    strip.set_yticks([])
    strip.set_title("member of", fontsize=fontsize + 1)
    fig.suptitle(title or "class groups")
    return save_figure(fig, path)


def plot_reliability(
    bins: Mapping[str, ReliabilityBins],
    path: str | Path,
    ece: Mapping[str, float],
    title: str = "",
    loggers: Sequence[Any] = (),
    key: str | None = None,
    step: int | None = None,
) -> Path:
    """Reliability diagrams side by side (e.g. student and teacher), with the share of samples per bin.

    Bars are each confidence bin's accuracy; the red hatched box spans the gap to the bin's mean
    confidence (above the bar top: over-confident, below it: under-confident); the dashed diagonal is
    perfect calibration. Below, the share of samples in each bin.

    Args:
        bins: model name -> its bins (:class:`~kd_lightning.calibration.ConfidenceBins`).
        path: the PNG to write.
        ece: model name -> ECE shown in its panel (from
            :func:`~kd_lightning.calibration.expected_calibration_error` or its metric: the diagram
            does not compute one of its own).
        title: figure title.
        loggers, key, step: see :func:`save_figure`.

    Returns:
        ``path``.

    Raises:
        ValueError: ``bins`` is empty, or ``ece`` lacks one of its models.
    """
    if not bins:
        raise ValueError("`bins` must name at least one model.")
    missing = [name for name in bins if name not in ece]
    if missing:
        raise ValueError(f"`ece` has no value for {missing}; it has {sorted(ece)}.")
    plt = pyplot()
    k = len(bins)
    fig, axes = plt.subplots(
        2, k, figsize=(4.2 * k, 5.2), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    for j, (name, b) in enumerate(bins.items()):
        n_bins = len(b.counts)
        edges = np.linspace(0, 1, n_bins + 1)
        centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
        acc, conf = np.nan_to_num(b.accuracy), np.nan_to_num(b.confidence)
        top, bottom = axes[0, j], axes[1, j]
        top.bar(
            centres,
            acc,
            width=width,
            color="tab:blue",
            alpha=0.55,
            edgecolor="black",
            lw=0.5,
            label="accuracy",
        )
        filled = b.counts > 0
        # Unfilled and hatched, between accuracy and confidence: readable on both sides of the bar top.
        top.bar(
            centres[filled],
            np.abs(conf - acc)[filled],
            bottom=np.minimum(acc, conf)[filled],
            width=width,
            fill=False,
            hatch="///",
            edgecolor="tab:red",
            lw=0.8,
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
        top.set_title(f"{name}: ECE {100 * ece[name]:.2f}%")
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize=8)
        total = max(b.counts.sum(), 1)
        bottom.bar(centres, b.counts / total, width=width, color="grey", edgecolor="black", lw=0.5)
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (top-1 probability)")
        bottom.set_ylabel("share of samples")
    fig.suptitle(title or "reliability")
    return save_figure(fig, path, loggers, key, step)


def plot_per_class_accuracy(
    accuracy: Mapping[str, Tensor | np.ndarray | Sequence[float]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    loggers: Sequence[Any] = (),
    key: str | None = None,
    step: int | None = None,
) -> Path:
    """Grouped bars: the accuracy of each model (e.g. student, teacher) on each class.

    Args:
        accuracy: model name -> ``(C,)`` accuracy per class (``nan`` for a class with no samples).
        class_names: ``C`` names.
        path: the PNG to write.
        title: figure title.
        loggers, key, step: see :func:`save_figure`.

    Returns:
        ``path``.

    Raises:
        ValueError: a model's accuracies are not ``C`` values.
    """
    plt = pyplot()
    c = len(class_names)
    values = {name: _numpy(a) for name, a in accuracy.items()}
    for name, a in values.items():
        if a.shape != (c,):
            raise ValueError(
                f"`accuracy[{name!r}]` must hold {c} values (one per class name), got {a.shape}."
            )
    fig, ax = plt.subplots(figsize=(min(3 + 0.45 * c * max(len(values), 1), 30), 4.2))
    width = 0.8 / max(len(values), 1)
    x = np.arange(c)
    for j, (name, a) in enumerate(values.items()):
        ax.bar(x + (j - (len(values) - 1) / 2) * width, 100 * np.nan_to_num(a), width, label=name)
    ax.set_xticks(x, list(class_names), rotation=45 if c > 5 else 0, ha="right" if c > 5 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # room above 100% for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=max(len(values), 1), fontsize=8)
    ax.set_title(title or "accuracy per class")
    return save_figure(fig, path, loggers, key, step)


def plot_confusion_matrix(
    matrix: Tensor | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    loggers: Sequence[Any] = (),
    key: str | None = None,
    step: int | None = None,
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), each row normalised to 100%.

    Cells hold the row percentage when there are at most 20 classes; the row's sample count is in
    its label.

    Args:
        matrix: ``(C, C)`` counts.
        class_names: ``C`` names.
        path: the PNG to write.
        title: figure title.
        loggers, key, step: see :func:`save_figure`.

    Returns:
        ``path``.

    Raises:
        ValueError: ``matrix`` is not ``(C, C)``.
    """
    plt = pyplot()
    m = _numpy(matrix)
    c = len(class_names)
    if m.shape != (c, c):
        raise ValueError(f"`matrix` must be ({c}, {c}) for {c} class names, got {m.shape}.")
    rows = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, m / rows, 0.0)
    size = min(3.5 + 0.5 * c, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(100 * share, cmap="Blues", vmin=0, vmax=100)
    fontsize = max(4, min(9, int(300 / max(c, 1))))
    ax.set_xticks(range(c), list(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(range(c), [f"{name} ({int(n)})" for name, n in zip(class_names, rows[:, 0], strict=True)])
    ax.tick_params(axis="y", labelsize=fontsize)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{100 * share[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (samples)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="% of the true class")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path, loggers, key, step)


def plot_specialist_breakdown(
    report: Mapping[str, Any],
    path: str | Path,
    title: str = "",
    baseline: str = "generalist",
    combined: str = "kl",
    loggers: Sequence[Any] = (),
    key: str | None = None,
    step: int | None = None,
) -> Path:
    """The paper's Table 4 as a picture: accuracy of the generalist and of generalist + specialists, by
    the number of specialists covering the true class, and the change in points.

    Args:
        report: a :func:`~kd_lightning.specialists.specialist_report` (its ``acc`` and ``by_cover``).
        path: the PNG to write.
        title: figure title.
        baseline: the predictor compared against (``report`` key).
        combined: the combined predictor (``report`` key).
        loggers, key, step: see :func:`save_figure`.

    Returns:
        ``path``.

    Raises:
        ValueError: ``report`` has no ``by_cover`` rows, or they lack ``baseline`` / ``combined``.
    """
    rows = list(report.get("by_cover", []))
    if not rows:
        raise ValueError("`report` has no `by_cover` rows (make it with specialist_report).")
    for name in (baseline, combined):
        if name not in rows[0]["acc"]:
            raise ValueError(f"`report` rows have no predictor {name!r}; they have {sorted(rows[0]['acc'])}.")
    plt = pyplot()
    covers = [str(r["cover"]) for r in rows]
    x = np.arange(len(rows))
    base = np.array([100 * r["acc"][baseline] for r in rows])
    comb = np.array([100 * r["acc"][combined] for r in rows])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.bar(x - 0.2, base, 0.4, label=baseline, color="tab:grey")
    left.bar(x + 0.2, comb, 0.4, label=combined, color="tab:green")
    for i, r in enumerate(rows):
        left.text(i, max(base[i], comb[i]) + 1, f"n={r['count']}", ha="center", fontsize=8)
    left.set_xticks(x, covers)
    left.set_xlabel("specialists covering the true class")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 125)  # room above 100% for the counts and the legend
    left.set_yticks(range(0, 101, 20))
    left.legend(loc="upper center", ncol=2, fontsize=8)
    acc = report.get("acc", {})
    if baseline in acc and combined in acc:
        left.set_title(
            f"overall: {baseline} {100 * acc[baseline]:.2f}%, {combined} {100 * acc[combined]:.2f}%"
        )
    delta = comb - base
    right.bar(x, delta, 0.5, color=np.where(delta >= 0, "tab:green", "tab:red"))
    right.axhline(0, color="black", lw=0.8)
    for i, d in enumerate(delta):
        right.text(i, d, f"{d:+.2f}", ha="center", va="bottom" if d >= 0 else "top", fontsize=8)
    right.set_xticks(x, covers)
    right.set_xlabel("specialists covering the true class")
    right.set_ylabel(f"{combined} - {baseline} (points)")
    right.set_title("change in accuracy")
    fig.suptitle(title or "generalist + specialists by coverage (Table 4)")
    return save_figure(fig, path, loggers, key, step)


def pareto_front(cost: Sequence[float], acc: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none is at most as costly and strictly more accurate
    (or cheaper and at least as accurate); sorted by cost.

    Example:
        >>> pareto_front([1, 2, 3, 4], [0.5, 0.7, 0.6, 0.8])
        [0, 1, 3]
    """
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -acc[i]))
    front, best = [], -float("inf")
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return front


def plot_accuracy_vs_cost(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    costs: Sequence[tuple[str, str]] = (
        ("flops", "FLOPs per example"),
        ("latency_ms", "latency per batch (ms)"),
    ),
    loggers: Sequence[Any] = (),
    key: str | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy against cost for single models and ensembles, one panel per cost, Pareto front marked.

    Args:
        points: one mapping per model with ``family`` (a series, e.g. ``"MLP-256 ensembles"`` or
            ``"single models"``; a family whose name starts with "single" is drawn in black), ``label``
            (printed beside the marker, e.g. ``"3x256"``; empty for none), ``acc`` (fraction),
            optional ``acc_std``, and one value per cost key.
        path: the PNG to write.
        costs: ``(key, axis label)`` per panel; costs are drawn on a log axis.
        loggers: W&B loggers that also get the image (see :func:`save_figure`).
        key: W&B key.
        title: figure title.

    Raises:
        ValueError: ``points`` is empty or a point lacks a cost key.
    """
    if not points:
        raise ValueError("`points` is empty: nothing to plot.")
    for key_name, _ in costs:
        missing = [p.get("label") for p in points if key_name not in p]
        if missing:
            raise ValueError(f"`points` {missing} lack the cost {key_name!r}.")
    plt = pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(costs), figsize=(6.2 * len(costs), 4.6), squeeze=False)
    families = list(dict.fromkeys(p["family"] for p in points))
    colours = plt.get_cmap("tab10")
    for ax, (cost_key, cost_label) in zip(axes[0], costs, strict=True):
        for f, family in enumerate(families):
            series = sorted((p for p in points if p["family"] == family), key=lambda p: p[cost_key])
            x = [p[cost_key] for p in series]
            y = [100 * p["acc"] for p in series]
            err = [100 * p.get("acc_std", 0.0) for p in series]
            single = family.startswith("single")
            ax.errorbar(
                x, y, yerr=err, marker="s" if single else "o", ms=6, lw=2 if single else 1.3,
                color="black" if single else colours(f), capsize=2, label=family,
            )  # fmt: skip
            for p, xi, yi in zip(series, x, y, strict=True):
                if p["label"]:
                    ax.annotate(p["label"], (xi, yi), textcoords="offset points", xytext=(4, -11), fontsize=7)
        cost = [p[cost_key] for p in points]
        acc = [p["acc"] for p in points]
        front = pareto_front(cost, acc)
        ax.step(
            [cost[i] for i in front], [100 * acc[i] for i in front], where="post",
            color="grey", ls="--", lw=1, alpha=0.8, label="Pareto front",
        )  # fmt: skip
        ax.set_xscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        # Minor ticks are labelled within one decade only: over several they would overlap.
        one_decade = max(cost) < 10 * min(cost)
        ax.xaxis.set_minor_formatter(plain if one_decade else ticker.NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(cost_label + " (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "accuracy against cost: single models and ensembles")
    return save_figure(fig, path, loggers, key)
