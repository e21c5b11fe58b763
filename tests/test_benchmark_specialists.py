"""scripts/benchmark_specialists.py's pooling of the seeds' Table 4 rows."""

from __future__ import annotations

from conftest import load_script

bs = load_script("benchmark_specialists")


def _row(cover, count, gen, kl):
    return {"cover": cover, "count": count, "acc": {"generalist": gen, "kl": kl}}


def test_pool_by_cover_sums_counts_and_weights_accuracies_by_them():
    reports = [
        {"by_cover": [_row(0, 10, 0.5, 0.5), _row(1, 30, 0.6, 0.7)]},
        {"by_cover": [_row(1, 10, 0.2, 0.3), _row(2, 5, 0.4, 0.8)]},
    ]
    pooled = bs.pool_by_cover(reports)
    assert [(p["cover"], p["count"]) for p in pooled] == [(0, 10), (1, 40), (2, 5)]
    assert abs(pooled[1]["acc"]["generalist"] - (30 * 0.6 + 10 * 0.2) / 40) < 1e-12
    assert abs(pooled[1]["acc"]["kl"] - (30 * 0.7 + 10 * 0.3) / 40) < 1e-12
