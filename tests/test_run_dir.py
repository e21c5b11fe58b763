"""One run, one directory: checkpoints and logs derive from ``default_root_dir`` and the seed, and a run never
overwrites another run's checkpoint unless told to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.callbacks.run_identity import read_run_record, run_directory
from kd_lightning.cli import main
from kd_lightning.workflows.stage import run_stage


def tiny_config(path: Path, checkpoint: dict | None = None) -> Path:
    """A 1-epoch, 2-step `kd fit` config on Synthetic data, no logger."""
    config = {
        "seed_everything": 5,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": "runs/a",
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"filename": "final", "save_last": True, "enable_version_counter": False}
                    | (checkpoint or {}),
                }
            ],
        },
        "model": {
            "class_path": "kd_lightning.modules.ClassifierModule",
            "init_args": {"net": {"class_path": "kd_lightning.models.MLP", "init_args": {"hidden": [8]}}},
        },
        "data": {
            "class_path": "kd_lightning.datamodules.IndexedDataModule",
            "init_args": {
                "source": {
                    "class_path": "kd_lightning.datamodules.Synthetic",
                    "init_args": {"num_superclasses": 2, "classes_per_superclass": 2, "dim": 8},
                },
                "batch_size": 16,
                "val_size": 32,
            },
        },
    }
    file = path / "tiny.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


def fit(config: Path, *args: str):
    return main(["fit", "--config", str(config), *args])


def test_run_directory_is_the_root_and_the_seed():
    assert run_directory("runs/a", 5) == Path("runs/a/seed5")
    assert run_directory("runs/a/seed5", 5) == Path("runs/a/seed5")  # a run's own saved config, given back
    assert run_directory("runs/a/seed5", 6) == Path("runs/a/seed5/seed6")
    assert run_directory("runs/a", None) == Path("runs/a/unseeded")


def test_runs_with_different_directories_or_seeds_write_different_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    fit(config)
    fit(config, "--trainer.default_root_dir=runs/b")
    fit(config, "--seed_everything=6")
    written = {
        (root, seed): tmp_path / root / f"seed{seed}" / "checkpoints" / "final.ckpt"
        for root, seed in [("runs/a", 5), ("runs/b", 5), ("runs/a", 6)]
    }
    assert all(path.is_file() for path in written.values()), sorted(tmp_path.rglob("*.ckpt"))
    for (root, seed), path in written.items():
        record = read_run_record(path)
        assert (
            record["run_dir"] == str((tmp_path / root / f"seed{seed}").resolve()) and record["seed"] == seed
        )
    # The saved config of a run names its own directory and, given back, lands in the same one.
    saved = tmp_path / "runs/a/seed5/config.yaml"
    assert yaml.safe_load(saved.read_text())["trainer"]["default_root_dir"] == "runs/a/seed5"
    fit(saved)
    assert not (tmp_path / "runs/a/seed5/seed5").exists()


def test_another_runs_checkpoint_is_refused_naming_the_file_and_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Both runs write to one explicit directory: only the run identity tells them apart.
    config = tiny_config(tmp_path, {"dirpath": "shared"})
    fit(config)
    final = tmp_path / "shared" / "final.ckpt"
    before = final.read_bytes()
    with pytest.raises(FileExistsError) as err:
        fit(config, "--seed_everything=6")
    message = str(err.value)
    assert repr(str(final)) in message or repr(str(final.resolve())) in message, message
    assert "seed 5" in message and "seed 6" in message and "--run.overwrite=true" in message
    assert final.read_bytes() == before  # nothing of the first run was touched
    # The same run again (same directory and seed) may replace its own checkpoint.
    fit(config)
    assert read_run_record(final)["seed"] == 5
    # Told to, the other run replaces it.
    fit(config, "--seed_everything=6", "--run.overwrite=true")
    assert read_run_record(final)["seed"] == 6


def test_a_checkpoint_that_records_no_run_is_refused_and_a_version_counter_writes_beside_it(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    foreign = tmp_path / "runs/a/seed5/checkpoints/final.ckpt"
    foreign.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, foreign)  # e.g. written before runs were recorded
    with pytest.raises(FileExistsError, match="records no run"):
        fit(config)
    assert torch.load(foreign, weights_only=True) == {"state_dict": {}}
    fit(config, "--trainer.callbacks.enable_version_counter=true")
    assert torch.load(foreign, weights_only=True) == {"state_dict": {}}
    assert read_run_record(foreign.with_name("final-v1.ckpt"))["seed"] == 5


def test_a_finished_pipeline_stage_is_refit_in_its_own_directory(tmp_path):
    config = tiny_config(tmp_path)
    first = run_stage("tiny", config, tmp_path)
    assert Path(first.checkpoint) == tmp_path / "runs/a/seed5/checkpoints/final.ckpt"
    assert run_stage("tiny", config, tmp_path).reused
    again = run_stage("tiny", config, tmp_path, force=True)  # the same run: allowed to replace its own
    assert not again.reused and again.checkpoint == first.checkpoint


def test_an_unfinished_pipeline_stage_resumes_from_its_last_checkpoint(tmp_path, caplog):
    config = tiny_config(tmp_path)
    first = run_stage("tiny", config, tmp_path)
    (Path(first.checkpoint).parent / "result.json").unlink()  # as if killed before the stage finished
    with caplog.at_level("INFO"):
        again = run_stage("tiny", config, tmp_path, ["--trainer.max_epochs=2"])
    last = Path(first.checkpoint).with_name("last.ckpt")
    assert f"Restored all states from the checkpoint at {last}" in caplog.text
    assert "Resuming at global step 2 (epoch 0)" in caplog.text
    assert torch.load(again.checkpoint, weights_only=False)["global_step"] == 4  # epoch 2 added to epoch 1
