"""Figures, written as PNG files with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
