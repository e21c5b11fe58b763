"""The specialists benchmark's study (kd_lightning.workflows.specialist_study): pooling the seeds' Table 4
rows, and grouping methods on planted hierarchies."""

from __future__ import annotations

import sys

import pytest

from kd_lightning.workflows import specialist_study as bs


def _row(cover, count, gen, kl):
    return {"cover": cover, "count": count, "acc": {"generalist": gen, "kl": kl}}


def test_pool_by_cover_sums_counts_and_weights_accuracies_by_them():
    reports = [
        {"by_cover": [_row(0, 10, 0.5, 0.5), _row(1, 30, 0.6, 0.7)]},
        {"by_cover": [_row(1, 10, 0.2, 0.3), _row(2, 5, 0.4, 0.8)]},
    ]
    pooled = bs.pool_by_cover(reports)
    assert [(p["cover"], p["count"]) for p in pooled] == [(0, 10), (1, 40), (2, 5)]
    # The same weighted mean summed in another order: a few (4) float64 roundings apart.
    rel = 4 * sys.float_info.epsilon
    assert pooled[1]["acc"]["generalist"] == pytest.approx((30 * 0.6 + 10 * 0.2) / 40, rel=rel)
    assert pooled[1]["acc"]["kl"] == pytest.approx((30 * 0.7 + 10 * 0.3) / 40, rel=rel)


def test_grouping_ari_table_has_every_method_and_seed():
    small = {"small": dict(num_classes=30, num_groups=5, min_size=2, max_size=10, samples_per_class=20)}
    rows = bs.grouping_ari([0, 1], small)
    assert [(r["setting"], r["seed"]) for r in rows] == [("small", 0), ("small", 1)]
    assert all(list(r["ari"]) == list(bs.grouping_methods()) for r in rows)
    assert all(r["ari"]["spectral (default)"] >= 0.95 and sum(r["sizes"]) == 30 for r in rows)
    assert all(r["accuracy"] == 0.8 for r in rows)
    lines = bs.format_ari_table(rows).splitlines()
    header = next(line for line in lines if line.startswith("| setting"))
    assert all(label in header for label in bs.grouping_methods())
    body = [line for line in lines if line.startswith("| small")]
    assert [line.split(" | ")[1] for line in body] == ["0", "1", "worst"]
    worst = min(r["ari"]["k-means, raw columns"] for r in rows)
    assert body[-1].rstrip(" |").endswith(f"**{worst:.3f}**")
