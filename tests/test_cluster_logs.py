"""Logs fit for clusters: `kd fit` into a file writes plain lines (no carriage returns, no ANSI colour), one
per epoch and one every N steps, and Lightning's bar stays on a terminal or when chosen."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import TinySource
from lightning.pytorch.callbacks import TQDMProgressBar

from kd_lightning.cli import main
from kd_lightning.datamodules.base import IndexedDataModule
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule
from kd_lightning.optim import OneCycle
from kd_lightning.progress import PlainProgress, default_step_interval, wants_plain_progress

ROOT = Path(__file__).resolve().parents[1]

# One 430-step epoch: 4 classes x 250 training samples, 140 of them held out for validation, batch size 2.
# Logged as a shipped config logs: W&B (offline, no key), CSV beside it, checkpoints.
ONE_EPOCH_OF_430_STEPS = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": "runs/tiny",
        "logger": [
            {"class_path": "kd_lightning.loggers.KDWandbLogger", "init_args": {"project": "kd-tests"}},
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": ".", "name": "csv"},
            },
        ],
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"filename": "final", "save_last": True, "enable_version_counter": False},
            }
        ],
    },
    "model": {
        "class_path": "kd_lightning.modules.ClassifierModule",
        "init_args": {
            "net": {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden": [16]}},
            "lr_schedule": {"class_path": "kd_lightning.optim.OneCycle"},
        },
    },
    "data": {
        "class_path": "kd_lightning.datamodules.IndexedDataModule",
        "init_args": {
            "source": {
                "class_path": "kd_lightning.datamodules.Synthetic",
                "init_args": {
                    "num_superclasses": 2,
                    "classes_per_superclass": 2,
                    "dim": 8,
                    "train_per_class": 250,
                    "test_per_class": 10,
                },
            },
            "batch_size": 2,
            "eval_batch_size": 100,
            "val_size": 140,
        },
    },
}


@pytest.mark.slow  # one `kd` process: about 25 s on 2 busy cores
def test_kd_fit_into_a_file_writes_a_small_plain_log(tmp_path):
    """The issue's acceptance: a non-terminal `kd fit` log of one 430-step epoch is under 5 KB."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(ONE_EPOCH_OF_430_STEPS, sort_keys=False))
    # As a new user runs it: W&B on "auto" without a key (offline, with its one-line hint); no network.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", NETRC=str(tmp_path / "no-netrc"), WANDB_API_KEY="")
    kd = str(Path(sys.executable).with_name("kd"))
    log = tmp_path / "log.txt"
    with log.open("w") as out:  # a file, as under SLURM: not a terminal
        proc = subprocess.run(
            [kd, "fit", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    print(f"--- log.txt: {log.stat().st_size} bytes ---\n{text}--- end ---")
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text
    assert log.stat().st_size < 5000
    lines = text.splitlines()
    assert "fit: epochs 0-0, 430 steps each; step lines every 100 steps" in lines
    steps = [line for line in lines if line.startswith("epoch 0: ")]
    assert [line.split(" | ")[1] for line in steps] == ["step 100", "step 200", "step 300", "step 400"]
    (epoch,) = [line for line in lines if line.startswith("epochs: 1/1 done (100%)")]
    for part in ("| epoch 0 | step 430 | train/loss ", "| val/loss ", "| val/acc ", "| lr "):
        assert part in epoch
    # The same run's metrics on disk as CSV.
    (metrics,) = (tmp_path / "runs/tiny/seed0/csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(row.get("val/acc") for row in rows) and any(row.get("train/loss") for row in rows)


def _fit(tmp_path: Path, bar: PlainProgress, epochs: int = 2, **trainer_kwargs) -> None:
    module = ClassifierModule(
        lambda shape, n: MLP(shape, n, hidden=(8,)),
        num_classes=4,
        input_shape=(1, 8, 8),
        lr_schedule=OneCycle(),
    )
    data = IndexedDataModule(TinySource(4, n_train=320), batch_size=8, eval_batch_size=64, val_size=64)
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[bar], default_root_dir=tmp_path, **{**options, **trainer_kwargs}
    )
    trainer.fit(module, data)


def test_plain_progress_lines(tmp_path):
    out = io.StringIO()
    _fit(tmp_path, PlainProgress(every_n_steps=10, stream=out))  # 256 training samples / 8: 32 steps
    lines = out.getvalue().splitlines()
    assert lines[0] == "fit: epochs 0-1, 32 steps each; step lines every 10 steps"
    assert [line.split(":")[0] for line in lines[1:]] == ["epoch 0"] * 3 + ["epochs"] + ["epoch 1"] * 3 + [
        "epochs"
    ]
    assert lines[1].startswith("epoch 0: 10/32 done (31%)") and "| step 10 | loss " in lines[1]
    assert lines[4].startswith("epochs: 1/2 done (50%)") and "| epoch 0 | step 32 | train/loss " in lines[4]
    assert "| val/loss " in lines[4] and "| val/acc " in lines[4] and "| lr " in lines[4]
    assert lines[-1].startswith("epochs: 2/2 done (100%)") and lines[-1].endswith("s")
    assert "\r" not in out.getvalue()


def test_plain_progress_without_step_lines_and_with_validation_inside_an_epoch(tmp_path):
    out = io.StringIO()
    _fit(tmp_path, PlainProgress(every_n_steps=0, stream=out), epochs=1, val_check_interval=0.5)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("no step lines")
    assert lines[1].startswith("validation at step 16 | val/loss ")
    assert lines[2].startswith("epochs: 1/1 done") and len(lines) == 3


def test_plain_progress_stays_quiet_when_disabled(tmp_path):
    out = io.StringIO()
    bar = PlainProgress(stream=out)
    bar.disable()
    _fit(tmp_path, bar, epochs=1)
    assert out.getvalue() == ""


def test_default_step_interval_and_bad_input():
    assert default_step_interval(32) == 100 and default_step_interval(430) == 100
    assert default_step_interval(2000) == 200  # 10% of a long epoch
    with pytest.raises(ValueError, match="`every_n_steps` must be a non-negative integer or None, got -1"):
        PlainProgress(every_n_steps=-1)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_when_kd_installs_plain_progress():
    file, terminal = io.StringIO(), _Terminal()
    assert wants_plain_progress({}, file) and wants_plain_progress({"callbacks": []}, file)
    assert not wants_plain_progress({}, terminal)  # a terminal keeps Lightning's bar
    assert not wants_plain_progress({"callbacks": [TQDMProgressBar()]}, file)  # the user's choice wins
    assert not wants_plain_progress({"enable_progress_bar": False}, file)  # no progress output at all


def test_kd_in_a_log_file_gets_plain_progress(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(ONE_EPOCH_OF_430_STEPS, sort_keys=False))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when given args beside pytest's
    built = main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert isinstance(built.trainer.progress_bar_callback, PlainProgress)
    chosen = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    built = main(["--config", str(config), "--trainer.logger=false", *chosen], run=False)
    assert type(built.trainer.progress_bar_callback) is TQDMProgressBar
    off = main(
        ["--config", str(config), "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False
    )
    assert off.trainer.progress_bar_callback is None
    monkeypatch.setattr(sys, "stdout", _Terminal())
    built = main(["--config", str(config), "--trainer.logger=false"], run=False)
    assert type(built.trainer.progress_bar_callback) is TQDMProgressBar
