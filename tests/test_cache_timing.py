"""The cache timing (kd_lightning.workflows.cache_timing, scripts/benchmark_cache.py --timing) on tiny data:
every variant, rotated rounds, medians and ratios, the soft-target share; and the script's quick mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TinySource

from kd_lightning.workflows.cache_timing import ALONE, HAND, TimingSettings, cache_name_of, cache_timing

ROOT = Path(__file__).resolve().parents[1]
TINY = TimingSettings(hidden=(16,), batch_size=32, val_size=64, rounds=3, epochs=2, batches=3)


def test_every_variant_runs_in_rotated_rounds(tmp_path):
    report = cache_timing(tmp_path, TINY, source=TinySource(), log=None)
    names = [ALONE, cache_name_of("main"), cache_name_of("loader"), HAND]
    assert list(report.variants) == names
    assert report.order == [names, names[1:] + names[:1], names[2:] + names[:2]]
    for name, v in report.variants.items():
        assert len(v.epoch_seconds) == 3 * (2 - 1) and all(s > 0 for s in v.epoch_seconds)  # warm-up dropped
        assert v.steps_per_epoch == 3 and (v.gather_share is None) == (name in (ALONE, HAND))
        assert report.ratio(name, name) == 1.0
    for path in ("main", "loader"):
        assert 0 < report.variants[cache_name_of(path)].gather_share < 1
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(names) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert json.loads(json.dumps(report.as_json()))["ratios"][HAND]["hand"] == 1.0
    assert {"torch threads", "device", "CPUs given"} <= report.environment.keys()


def test_settings_are_checked(tmp_path):
    for bad, match in [
        (dict(gather_in=("gpu",)), "gather_in"),
        (dict(epochs=1, warmup_epochs=1), "warmup_epochs"),
        (dict(rounds=0), "rounds"),
        (dict(batches=0), "batches"),
    ]:
        with pytest.raises(ValueError, match=match):
            cache_timing(tmp_path, TimingSettings(**bad), source=TinySource(), log=None)


@pytest.mark.slow  # Fashion-MNIST read four times and an 800-800 MLP: about 30 s on 2 busy cores
def test_the_benchmark_timing_quick_mode_runs(tmp_path):
    command = [sys.executable, "scripts/benchmark_cache.py", "--timing", "--quick", "--threads", "1"]
    command += ["--rounds", "1", "--batches", "2", "--workdir", str(tmp_path)]
    out = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| cached, gather_in=loader |" in out and "| hand-written loop |" in out
    saved = json.loads((tmp_path / "cache_timing.json").read_text())
    assert set(saved["variants"]) == {ALONE, cache_name_of("main"), cache_name_of("loader"), HAND}
