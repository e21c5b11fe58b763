"""The intermediate-layer benchmark's workflow in its quick mode: every stage runs, the table's inputs exist."""

from __future__ import annotations

import math

import pytest

from kd_lightning.datamodules import FashionMNIST
from kd_lightning.workflows.feature_study import METHODS, QUICK, compare_feature_methods, paired_verdict


@pytest.mark.slow  # five stages on Fashion-MNIST at 3 training batches each: about 40 s on 2 busy cores
def test_quick_feature_study_runs_every_method_and_reuses_finished_stages(tmp_path):
    if not FashionMNIST().available():
        pytest.skip("Fashion-MNIST files missing: run `make data`")

    def run():
        return compare_feature_methods([1], "runs/bf", tmp_path, choose=False, overrides=QUICK)

    study = run()
    assert [m.name for m in study.methods] == list(METHODS)
    for m in study.methods:
        assert m.chosen == "config" and len(m.test_acc) == 1 and 0 <= m.test_acc[0] <= 1
        assert math.isclose(m.gains[0], m.test_acc[0] - study.alone[0])
        assert m.verdict == "no verdict (one seed)"
    # what storing the teacher's features would cost: far more than its 10 logits in fp16
    assert study.feature_bytes["FitNets hints"]["features"] == 2 * 16 * 14 * 14
    assert study.feature_bytes["attention transfer"]["attention_maps"] == 2 * (14 * 14 + 7 * 7)
    assert {s["logits"] for s in study.feature_bytes.values()} == {20}
    assert (tmp_path / "runs/bf/fitnets_hints/seed1").is_dir()
    again = run()  # finished stages are read back
    assert again.alone == study.alone and [m.test_acc for m in again.methods] == [
        m.test_acc for m in study.methods
    ]


def test_paired_verdict_needs_the_gain_beyond_twice_its_standard_error():
    assert paired_verdict([0.5, 0.5, 0.5], [0.4, 0.41, 0.39]) == "loss"
    assert paired_verdict([0.5, 0.5], [0.5, 0.5]) == "absent (within noise)"


def test_kd_feature_kd_is_built_from_the_signature():
    from kd_lightning.workflows import parser_for

    config = parser_for("feature-kd").parse_args(["--seeds", "[4, 5]", "--choose", "false"])
    assert config.seeds == [4, 5] and config.choose is False and config.out == "runs/benchmark_features"
