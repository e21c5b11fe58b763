"""Resume always continues: a `kd fit` killed with SIGKILL mid-epoch, resumed with `--ckpt_path last`.

The run is a real `kd` process on tiny images (conftest's TinySource: 192 training images in batches of 16,
12 steps per epoch, 3 epochs, random shifts and flips) with the shipped configs' two checkpoint callbacks
(final.ckpt every epoch, last.ckpt every epoch and every 5 steps here), dropout, AdamW and a OneCycle
schedule, logging offline to W&B. It
kills itself with SIGKILL at global step 17 (epoch 1, batch 5), two steps after the step checkpoint of
step 15 (no handler runs, nothing is flushed: what a power cut or the OOM killer leaves); or it gets
SIGTERM there (what a scheduler sends first), saves last.ckpt at step 17 and exits with status 143.

What is asserted, and why exactly: the resumed fit restores the model, AdamW's moments, the schedule's
position, the loader's place in the epoch (datamodules/resumable.py) and the random generators
(callbacks/run_identity.py), then recomputes steps 16..36 with the same operations on the same inputs in
the same order, in one thread (OMP_NUM_THREADS=1) on the same machine as the uninterrupted run. Nothing is
reassociated, so the final weights and the final epoch's logged metrics are asserted *equal* (bit for
bit), not close: any tolerance would hide a lost batch, a replayed batch or a reset schedule, which
move the weights by far more than one rounding. The epoch that was interrupted logs a training average
over the batches after the resume only (the accumulated sums of the killed process are gone), so it is
not compared.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from typing_extensions import override
from wandb_records import read_run, run_files

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS, KILL_AT, EVERY = 12, 3, 17, 5

pytestmark = pytest.mark.slow  # five `kd` processes: about 50 s on 2 busy cores


class KillAt(Callback):
    """Send this process ``signal`` (a name) once ``step`` optimizer steps are done. SIGKILL: no cleanup of
    any kind runs; SIGTERM: what a scheduler sends first when it preempts a job."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = step
        self.signal = signal
        self._sent = False

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self._sent:
            self._sent = True
            os.kill(os.getpid(), signal.Signals[self.signal])


def tiny_config(path: Path) -> Path:
    config = {
        "seed_everything": 5,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": EPOCHS,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": "runs/tiny",
            "logger": {
                "class_path": "kd_lightning.loggers.KDWandbLogger",
                "init_args": {"project": "kd-tests", "mode": "offline"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"filename": "final", "save_last": True, "enable_version_counter": False},
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "save_top_k": 0,
                        "save_last": True,
                        "every_n_train_steps": EVERY,
                        "enable_version_counter": False,
                    },
                },
            ],
        },
        "model": {
            "class_path": "kd_lightning.modules.ClassifierModule",
            "init_args": {
                "net": {
                    "class_path": "kd_lightning.models.MLP",
                    "init_args": {"hidden": [16], "dropout": 0.3},
                },
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
                "lr_schedule": {"class_path": "kd_lightning.optim.OneCycle"},
            },
        },
        "data": {
            "class_path": "kd_lightning.datamodules.IndexedDataModule",
            "init_args": {
                # conftest's 1x8x8 images (256 training images, 64 of them for validation), shifted and
                # flipped at random: the augmentation draws from torch's generator as the batch is fetched.
                "source": {"class_path": "conftest.TinySource", "init_args": {"num_classes": 4}},
                "train_transform": {
                    "class_path": "kd_lightning.datamodules.RandomShift",
                    "init_args": {"max_shift": 1, "hflip": True},
                },
                "batch_size": 16,
                "eval_batch_size": 64,
                "val_size": 64,
            },
        },
    }
    file = path / "tiny.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def kd_fit(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    kd = str(Path(sys.executable).with_name("kd"))
    env = {
        # Not WANDB_SERVICE: the W&B service of this pytest process (left by in-process W&B tests) would be
        # shared with the kd processes, and would still hold the killed process's run open.
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    return subprocess.run(
        [kd, "fit", "--config", str(workdir / "tiny.yaml"), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


RUN = Path("runs/tiny/seed5")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The uninterrupted run (its working directory)."""
    work = tmp_path_factory.mktemp("plain")
    tiny_config(work)
    done = kd_fit(work)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def interrupted_then_resumed(work: Path, signal_name: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run the tiny config, interrupted at step KILL_AT by ``signal_name``; then resume it with
    ``--ckpt_path last``. Returns the checkpoint it resumed from and the resumed process."""
    tiny_config(work)
    cut = kd_fit(
        work,
        "--trainer.callbacks+=test_resume.KillAt",
        f"--trainer.callbacks.step={KILL_AT}",
        f"--trainer.callbacks.signal={signal_name}",
    )
    expected = -signal.SIGKILL if signal_name == "SIGKILL" else 128 + signal.SIGTERM
    assert cut.returncode == expected, cut.stderr[-3000:]
    last = work / RUN / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["kd_run"]["run_dir"] == str((work / RUN).resolve())
    assert saved["kd_run"]["seed"] == 5 and saved["kd_run"]["wandb_id"]
    resumed = kd_fit(work, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"Restored all states from the checkpoint at {last.resolve()}" in output
    assert "not resumable" not in output  # Lightning's warning for loaders without a state
    return saved, resumed


def assert_same_end(plain: Path, work: Path, saved: dict) -> None:
    """Same final weights, optimizer moments, schedule, and last epoch's logged metrics; one W&B run."""
    final = {
        name: torch.load(path / RUN / "checkpoints" / "final.ckpt", weights_only=False)
        for name, path in (("plain", plain), ("resumed", work))
    }
    assert final["resumed"]["global_step"] == final["plain"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    for key, value in final["plain"]["state_dict"].items():
        assert torch.equal(final["resumed"]["state_dict"][key], value), key
    for plain_state, resumed_state in zip(
        final["plain"]["optimizer_states"], final["resumed"]["optimizer_states"], strict=True
    ):
        for p, state in plain_state["state"].items():
            assert torch.equal(resumed_state["state"][p]["exp_avg_sq"], state["exp_avg_sq"])
    assert final["resumed"]["lr_schedulers"] == final["plain"]["lr_schedulers"]

    # One W&B run continued: the interrupted process (a SIGKILL leaves its .wandb file unreadable) and the
    # resumed one wrote offline-run-<time>-<id> directories of the same run id, the one in the checkpoint.
    parts = sorted((work / RUN / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" appended by wandb when both started within the same second.
    ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", p.name).group(1) for p in parts]
    assert ids == [saved["kd_run"]["wandb_id"]] * 2, parts
    resumed_run = read_run(next(parts[1].glob("run-*.wandb")))
    (whole,) = [read_run(f) for f in run_files(plain / RUN)]
    assert resumed_run.run_id == saved["kd_run"]["wandb_id"]
    steps = [row["trainer/global_step"] for row in resumed_run.history]
    assert min(steps) > saved["global_step"]  # continues from the checkpoint, not from 0
    # The last epoch's metrics, logged by the resumed process, equal the uninterrupted run's.
    for key in ("val/loss", "val/acc", "train/loss", "train/acc", "epoch"):
        assert resumed_run.last(key) == whole.last(key), key


def test_killed_fit_resumes_from_the_step_checkpoint_and_ends_where_an_uninterrupted_one_does(
    plain, tmp_path
):
    saved, _ = interrupted_then_resumed(tmp_path, "SIGKILL")
    # The step checkpoint before the kill: mid-epoch 1 (two steps of work are lost and redone).
    assert saved["global_step"] == KILL_AT // EVERY * EVERY == 15 and saved["epoch"] == 1
    assert_same_end(plain, tmp_path, saved)


def test_sigterm_saves_the_last_checkpoint_where_it_stops_and_the_fit_resumes_from_it(plain, tmp_path):
    saved, _ = interrupted_then_resumed(tmp_path, "SIGTERM")
    # Saved at the batch boundary where SIGTERM stopped the fit: no step is lost.
    assert saved["global_step"] == KILL_AT and saved["epoch"] == 1
    assert_same_end(plain, tmp_path, saved)
