"""The capacity study (kd_lightning.workflows.capacity_study): the shipped synthetic configs run end to end
on tiny data with a real Trainer, and the report has the paper's Table 4 rows (1, 2, 3+ covering)."""

from __future__ import annotations

import json

import pytest

from kd_lightning.workflows import capacity_study as cs

# 30 classes (10 superclasses of 3), 40 training samples each, a few batches per epoch.
TINY = [
    "--data.init_args.source.init_args.classes_per_superclass=3",
    "--data.init_args.source.init_args.train_per_class=40",
    "--data.init_args.source.init_args.test_per_class=10",
    "--data.init_args.val_size=300",
    "--trainer.max_epochs=4",
    "--trainer.limit_train_batches=6",
]


def test_pooled_table4_merges_three_and_more():
    rows = [
        {"cover": k, "count": n, "acc": {"generalist": 0.5, "kl": a}}
        for k, n, a in ((1, 10, 0.55), (2, 10, 0.6), (3, 5, 0.6), (5, 5, 0.7))
    ]
    table = cs.pooled_table4([{"by_cover": rows}, {"by_cover": rows[:1]}])
    assert [(r["cover"], r["count"]) for r in table] == [("1", 20), ("2", 10), ("3+", 10)]
    assert table[2]["acc"]["kl"] == pytest.approx(0.65)
    assert table[1]["relative"] == pytest.approx(20.0)


def test_capacity_study_runs_the_shipped_configs_and_reports_three_coverage_rows(tmp_path):
    setting = {**cs.DEFAULT_SETTING, "epochs": 1, "overlap_threshold": 0.5}
    study = cs.capacity_study([1], tmp_path, setting, TINY, wide=True)
    run = study["runs"][0]
    report = run["report"]
    assert report["count"] == 300  # the whole (tiny) test split: 30 classes x 10
    covers = [row["cover"] for row in report["by_cover"]]
    assert sum(row["count"] for row in report["by_cover"]) == 300
    table = cs.pooled_table4([report])
    assert {"1", "2", "3+"} <= {row["cover"] for row in table}, covers
    assert run["wide"]["params"] > run["generalist"]["params"]
    assert 0.0 <= study["bayes_acc"] <= 1.0
    text = cs.format_capacity_report(study)
    assert "| 3+ |" in text and "Verdict:" in text and "+8.8 (3)" in text
    # Every stage ran through the shipped configs and left its record; a second call reuses them all.
    groups = json.loads((tmp_path / "seed1" / "specialists" / "chosen" / "groups.json").read_text())
    assert groups["method"]["overlap"] == 3 and groups["method"]["overlap_threshold"] == 0.5
    again = cs.capacity_study([1], tmp_path, setting, TINY, wide=False)
    assert again["runs"][0]["report"]["acc"] == report["acc"]


def test_choose_settings_reads_validation_only_and_records_every_candidate(tmp_path):
    record = cs.choose_settings(
        1,
        tmp_path,
        overlaps=({"overlap": 2, "overlap_threshold": 0.5},),
        epochs=(1,),
        soft_weights=(0.0, 0.5),
        overrides=TINY,
    )
    assert [r["setting"] for r in record["rounds"]] == ["overlap", "epochs", "soft_weight"]
    assert len(record["rounds"][2]["scores"]) == 2
    assert record["chosen"]["soft_weight"] in (0.0, 0.5)
    saved = json.loads((tmp_path / "seed1" / "selection.json").read_text())
    assert saved["chosen"] == record["chosen"] and "validation" in saved["monitor"]
