"""The accelerator benchmark (kd_lightning.workflows.gpu_benchmark, scripts/benchmark_gpu.py) in its tiny
configuration on the CPU, through real Trainers: the table's rows and columns, and the FLOP limit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_lightning.costs import forward_flops
from kd_lightning.workflows import gpu_benchmark as gb


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    return gb.run_benchmark(gb.BenchmarkSettings.tiny_cpu(), tmp_path_factory.mktemp("gpu_benchmark"))


def test_tiny_table_has_every_variant_of_both_pairs(tiny_report):
    lines = tiny_report.table().splitlines()
    assert lines[0] == "| " + " | ".join(gb.COLUMNS) + " |"
    body = [line.strip("|").split(" | ") for line in lines[2:]]
    assert all(len(cells) == len(gb.COLUMNS) for cells in body)
    variants = [
        ("student alone", "32-true"),
        ("student alone", "bf16-mixed"),
        ("online", "32-true"),
        ("online", "bf16-mixed"),
        ("online, teacher bf16 + channels_last", "bf16-mixed"),
        ("online, teacher bf16 + channels_last + torch.compile", "bf16-mixed"),
        ("cached (SoftTargetCache, float16 logits)", "32-true"),
        ("store build (32 images)", "32-true"),
    ]
    expected = [(pair, *v) for pair in gb.TINY_PAIRS for v in variants]
    assert [(r.pair, r.variant, r.precision) for r in tiny_report.rows] == expected
    assert [tuple(c.strip() for c in cells[:3]) for cells in body] == expected
    for row in tiny_report.rows:
        if row.variant.endswith("torch.compile"):
            assert row.note.startswith("skipped: --tiny run") and row.images_per_s is None
            continue
        assert row.images_per_s > 0 and row.ratio > 0 and row.peak_mib is None  # CPU: n/a
        if row.variant.startswith("store build"):
            assert row.ratio_of.startswith(gb.BUILD_RATIO) and row.data_wait is None
        else:
            assert row.ratio_of == f"{gb.TIME_RATIO} ({row.precision})" and 0.0 <= row.data_wait < 1.0
        if row.variant == "student alone":
            assert row.ratio == 1.0
    assert {
        "device",
        "CPUs given",
        "data",
        "load average before (1, 5, 15 min)",
    } <= tiny_report.environment.keys()
    assert tiny_report.environment["device"].startswith("CPU")


def test_flop_limit_is_the_formula_from_the_costs(tiny_report):
    for pair, (teacher, student) in gb.TINY_PAIRS.items():
        f_t = np.float64(forward_flops(teacher(gb.SHAPE, gb.NUM_CLASSES), gb.SHAPE))
        f_s = np.float64(forward_flops(student(gb.SHAPE, gb.NUM_CLASSES), gb.SHAPE))
        assert tiny_report.flops[pair] == {"teacher": int(f_t), "student": int(f_s)}
        limit = np.float64(1.0) + f_t / (np.float64(3.0) * f_s)
        online = [r for r in tiny_report.rows if r.pair == pair and r.variant.startswith("online")]
        assert len(online) == 4
        assert all(r.flop_limit == pytest.approx(limit, rel=4 * np.finfo(np.float64).eps) for r in online)
        others = [r for r in tiny_report.rows if r.pair == pair and not r.variant.startswith("online")]
        assert all(r.flop_limit is None for r in others)


def test_report_is_written_as_markdown_and_json(tiny_report, tmp_path):
    md, js = gb.write_report(tiny_report, tmp_path / "gpu.md")
    assert md.read_text() == tiny_report.markdown() and tiny_report.table() in md.read_text()
    data = json.loads(js.read_text())
    assert len(data["rows"]) == len(tiny_report.rows) and data["flops"] == tiny_report.flops
    with pytest.raises(ValueError, match=r"`out` must end in .md or .json, got '.*gpu.txt'"):
        gb.write_report(tiny_report, tmp_path / "gpu.txt")


def test_flop_limit_and_settings_reject_bad_input():
    assert gb.flop_limit(300, 100) == 2.0
    with pytest.raises(ValueError, match="FLOPs must be positive"):
        gb.flop_limit(300, 0)
    with pytest.raises(ValueError, match="`steps` must be a positive integer, got 0"):
        gb.run_benchmark(gb.BenchmarkSettings(steps=0), "unused")
