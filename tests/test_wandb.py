"""W&B logging, offline (conftest sets WANDB_MODE=offline): read back what runs wrote to their ``.wandb``
files; keys, images, artifacts and lineage; one run under DDP; two CLI runs in a row; bad input;
logging trouble that must not cost a checkpoint."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
from conftest import TinySource
from lightning.pytorch.callbacks import ModelCheckpoint
from trainers import ReleaseProcessGroup
from wandb_records import is_finite_number, read_run, run_files

from kd_lightning import loggers
from kd_lightning.callbacks import ArtifactLogger, DistillationDashboard, SoftTargetCache
from kd_lightning.cli import main
from kd_lightning.datamodules.base import IndexedDataModule
from kd_lightning.ensemble import Ensemble
from kd_lightning.loggers import KDWandbLogger, check_writable_dir, resolve_mode
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.optim import OneCycle
from kd_lightning.store import file_sha256

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
TEACHER_NET = partial(SmallCNN, channels=(4,), head=16)
STUDENT_NET = partial(MLP, hidden=(16,))
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(autouse=True)
def _no_run_left_open():
    yield
    wandb.finish()  # a failing test must not hand its open run to the next one


def fit(
    tmp_path: Path, name: str, module: L.LightningModule, callbacks=(), epochs: int = 2, **logger_kwargs
) -> tuple[L.Trainer, Path]:
    save_dir = tmp_path / name
    logger = KDWandbLogger(save_dir=str(save_dir), name=name, project="kd-tests", **logger_kwargs)
    checkpoint = ModelCheckpoint(
        dirpath=save_dir / "checkpoints", filename="final", enable_version_counter=False
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        logger=logger,
        callbacks=[*callbacks, checkpoint],
        default_root_dir=save_dir,
        **QUIET,
    )
    data = IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=64, val_size=64)
    trainer.fit(module, data)
    return trainer, save_dir


def only_run(save_dir: Path):
    wandb.finish()  # flush: the record file is complete once the run has finished
    files = run_files(save_dir)
    assert len(files) == 1, files
    return read_run(files[0])


@pytest.fixture
def teacher_run(tmp_path):
    torch.manual_seed(0)
    teacher = ClassifierModule(TEACHER_NET, 4, SHAPE)
    trainer, save_dir = fit(tmp_path, "teacher", teacher, [ArtifactLogger()], job_type="teacher")
    return save_dir / "checkpoints" / "final.ckpt", only_run(save_dir)


# ---------------------------------------------------------------------------------------------
# What a run writes


def test_teacher_run_logs_metrics_config_and_its_checkpoint_artifact(teacher_run):
    ckpt, run = teacher_run
    assert ckpt.is_file()
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "trainer/global_step"):
        assert is_finite_number(run.last(key)), key
    assert run.config["num_classes"] == 4  # the module's hyperparameters
    (artifact,) = [a for a in run.artifacts if a["type"] == "model"]
    assert artifact["name"].endswith("teacher-checkpoints-final.ckpt") and artifact["files"] == ["final.ckpt"]


@pytest.mark.slow  # a teacher and two students with W&B runs: ~12 s
def test_student_run_logs_the_dashboard_images_store_and_lineage(tmp_path, teacher_run, monkeypatch):
    teacher_ckpt, _ = teacher_run
    monkeypatch.chdir(tmp_path)  # artifact names are paths relative to the working directory
    store = tmp_path / "store"

    def student_callbacks():
        return [
            SoftTargetCache(str(store), teacher_ckpt=str(teacher_ckpt), dtype="float32", batch_size=64),
            DistillationDashboard(n_bins=10),
            ArtifactLogger(),
        ]

    student = DistillationModule(STUDENT_NET, 4, SHAPE, teacher_ckpt=str(teacher_ckpt))
    _, save_dir = fit(tmp_path, "student", student, student_callbacks(), group="g1", tags=["kd", "test"])
    run = only_run(save_dir)

    expected = ["val/acc", "val/teacher_acc", "val/agreement", "val/kd_loss", "train/hard", "train/soft"]
    expected += ["val/loss", "val/kd_hard", "val/kd_soft", "dashboard/kl_teacher_student"]
    expected += ["dashboard/student_ece", "dashboard/teacher_ece", "dashboard/student_class_acc/0_c0"]
    expected += ["dashboard/teacher_class_acc/3_c3", "train/temperature"]
    for key in expected:
        assert is_finite_number(run.last(key)), (key, run.last(key))
    # The module's own metrics are the only copy: the dashboard logs only what it alone computes.
    own = {"kl_teacher_student", "student_ece", "teacher_ece", "student_class_acc", "teacher_class_acc"}
    pictures = {"reliability", "per_class_accuracy", "confusion_matrix"}
    logged = run.keys()
    assert {k.split("/")[1] for k in logged if k.startswith("dashboard/")} == own | pictures
    # Pictures: logged as W&B images, and the same PNGs in the run's directory.
    for name in ("reliability", "per_class_accuracy", "confusion_matrix"):
        assert run.last(f"dashboard/{name}/_type") == "images/separated"
        (logged,) = run.last(f"dashboard/{name}/filenames")
        assert (run.path.parent / "files" / logged).is_file(), logged
        assert (save_dir / "dashboard" / f"{name}.png").is_file()
    media = list(run.path.parent.glob("files/media/images/dashboard/*.png"))
    assert len(media) == 6, media  # three pictures at each of two epochs
    # Run metadata and the full resolved config are with the run.
    assert run.config["lineage"]["teacher"]["sha256"] == file_sha256(teacher_ckpt)
    assert run.config["lineage"]["teacher"]["artifact"] == "model-teacher-checkpoints-final.ckpt"
    # The store this run built is an artifact of it.
    stores = {a["name"]: a for a in run.artifacts if a["type"] == "soft-targets"}
    assert set(stores) == {"soft-targets-store-train", "soft-targets-store-val"}, stores
    assert stores["soft-targets-store-train"]["metadata"]["teacher"]["fingerprint"]

    # A second student reuses the store: it records which store (and teacher) it read.
    student = DistillationModule(STUDENT_NET, 4, SHAPE, teacher_ckpt=str(teacher_ckpt))
    _, save_dir = fit(tmp_path, "student2", student, student_callbacks(), epochs=1)
    run2 = only_run(save_dir)
    used = run2.config["lineage"]["soft_targets"]
    assert set(used) == {"train", "val"} and used["train"]["path"] == str((store / "train").resolve())
    assert used["train"]["artifact"] == "soft-targets-store-train"
    assert not [a for a in run2.artifacts if a["type"] == "soft-targets"]  # used, not produced


def test_groups_file_is_an_artifact(tmp_path, monkeypatch):
    from kd_lightning.callbacks import ConfusionClustering

    monkeypatch.chdir(tmp_path)
    clustering = ConfusionClustering(2, str(tmp_path / "groups.json"), min_specialist_size=1)
    # ArtifactLogger first, as in the shipped configs: it still finds the heatmap drawn at the end.
    _, save_dir = fit(
        tmp_path, "generalist", ClassifierModule(STUDENT_NET, 4, SHAPE), [ArtifactLogger(), clustering]
    )
    run = only_run(save_dir)
    (groups,) = [a for a in run.artifacts if a["type"] == "class-groups"]
    assert groups["name"] == "class-groups-groups.json" and sorted(groups["files"]) == [
        "groups.json",
        "groups.png",
    ]
    assert run.last("clustering/groups/_type") == "images/separated"


# ---------------------------------------------------------------------------------------------
# DDP: one run


def ddp_fit(save_dir: str) -> None:
    """Fit a student on 2 gloo processes with W&B and the dashboard (module level: picklable)."""
    torch.manual_seed(0)
    module = DistillationModule(STUDENT_NET, 4, SHAPE, teacher=TEACHER_NET(SHAPE, 4))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=2,
        logger=KDWandbLogger(save_dir=save_dir, name="ddp", project="kd-tests"),
        callbacks=[DistillationDashboard(), ArtifactLogger(), ReleaseProcessGroup()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=save_dir,
    )
    trainer.fit(module, IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=16, val_size=64))


@pytest.mark.slow  # two spawned processes: ~20 s on 2 busy cores
def test_ddp_writes_one_run_with_every_key(tmp_path):
    ddp_fit(str(tmp_path))
    run = only_run(tmp_path)
    for key in ("val/acc", "val/agreement", "dashboard/student_ece", "dashboard/kl_teacher_student"):
        assert is_finite_number(run.last(key)), key
    assert sum("dashboard/student_ece" in row for row in run.history) == 1  # rank 0 logged, once
    assert len(list(run.path.parent.glob("files/media/images/dashboard/*.png"))) == 3
    assert sorted(p.name for p in (tmp_path / "dashboard").iterdir()) == [
        "confusion_matrix.png",
        "per_class_accuracy.png",
        "reliability.png",
    ]


# ---------------------------------------------------------------------------------------------
# The CLI: config with the run, two runs in a row


CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 2
  accelerator: cpu
  enable_progress_bar: false
  logger:
    class_path: kd_lightning.loggers.KDWandbLogger
    init_args: {save_dir: runs/tiny, name: tiny, project: kd-tests, group: cli, tags: [a, b]}
  callbacks:
    - class_path: kd_lightning.callbacks.DistillationDashboard
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: runs/tiny/checkpoints, filename: final, enable_version_counter: false}
model:
  class_path: kd_lightning.modules.ClassifierModule
  init_args:
    net: {class_path: kd_lightning.models.MLP, init_args: {hidden: [8]}}
data:
  class_path: kd_lightning.datamodules.IndexedDataModule
  init_args:
    source:
      class_path: kd_lightning.datamodules.Synthetic
      init_args: {num_superclasses: 2, classes_per_superclass: 2, dim: 8, train_per_class: 16, test_per_class: 4}
    batch_size: 16
    val_size: 16
"""


@pytest.mark.slow  # two CLI fits: ~8 s
def test_two_cli_runs_in_a_row_from_the_same_config_and_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    for _ in range(2):
        main(["fit", "--config", str(config)])
        wandb.finish()
    save_dir = tmp_path / "runs" / "tiny"
    files = run_files(save_dir)
    assert len(files) == 2, files  # two runs, not one appended to
    runs = [read_run(f) for f in files]
    assert runs[0].run_id != runs[1].run_id
    for run in runs:
        wandb_logger, csv_logger = run.config["cli"]["trainer"]["logger"]  # full resolved config
        assert wandb_logger["init_args"]["group"] == "cli" and csv_logger["class_path"].endswith("CSVLogger")
        assert run.config["cli"]["model"]["init_args"]["net"]["init_args"]["hidden"] == [8]
        assert is_finite_number(run.last("dashboard/student_ece"))
        assert (run.path.parent / "files" / "kd_config.yaml").is_file()
    assert (save_dir / "config.yaml").is_file() and (save_dir / "checkpoints" / "final.ckpt").is_file()
    assert (save_dir / "dashboard" / "reliability.png").is_file()


def test_unknown_logger_option_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--trainer.logger.init_args.projcet=x"], run=False)
    assert "projcet" in capsys.readouterr().err
    with pytest.raises(TypeError, match="projcet"):
        KDWandbLogger(save_dir=str(tmp_path), projcet="x")
    with pytest.raises(ValueError, match=r"`init_kwargs`: unknown wandb.init option\(s\) \['bogus'\]"):
        KDWandbLogger(save_dir=str(tmp_path), init_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="KDWandbLogger arguments of their own"):
        KDWandbLogger(save_dir=str(tmp_path), init_kwargs={"project": "x"})
    with pytest.raises(ValueError, match="`mode` must be one of"):
        KDWandbLogger(save_dir=str(tmp_path), mode="offlne")


def test_unwritable_log_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="`save_dir`: .* is a file"):
        KDWandbLogger(save_dir=str(blocker / "runs"))
    locked = tmp_path / "locked"
    locked.mkdir()
    # root can write anywhere, so the permission check is exercised through os.access.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(
        PermissionError, match="`save_dir`: the log directory .* would be created in .* not writable"
    ):
        check_writable_dir(locked / "runs" / "x")
    with pytest.raises(PermissionError, match="`save_dir`: the log directory .*locked' is not writable"):
        KDWandbLogger(save_dir=str(locked))


# ---------------------------------------------------------------------------------------------
# Never blocked: no key, no network, logging errors


def test_auto_mode_without_a_key_is_offline_with_a_hint(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("auto") == "offline"
    logger = KDWandbLogger(save_dir=str(tmp_path), name="hint")
    with caplog.at_level("INFO"):
        run = logger.experiment
    assert run.offline
    hints = [r.getMessage() for r in caplog.records if "no API key found" in r.getMessage()]
    assert len(hints) == 1 and "wandb login" in hints[0] and "\n" not in hints[0]
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") is None  # WANDB_MODE decides
    assert resolve_mode("offline") == "offline"


def test_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    real_init = wandb.init

    def refusing_init(**kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("no network")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", refusing_init)
    logger = KDWandbLogger(save_dir=str(tmp_path), mode="online")
    with pytest.warns(UserWarning, match="could not start an online run.*CommError: no network"):
        run = logger.experiment
    assert run.offline


def test_logging_errors_never_cost_a_checkpoint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise wandb.errors.CommError("server gone")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log_artifact", broken)
    with pytest.warns(UserWarning, match="W&B: logging .* failed .*server gone.*training goes on"):
        trainer, save_dir = fit(
            tmp_path,
            "broken",
            ClassifierModule(STUDENT_NET, 4, SHAPE),
            [DistillationDashboard(), ArtifactLogger()],
        )
    assert trainer.state.finished and trainer.current_epoch == 2
    assert (save_dir / "checkpoints" / "final.ckpt").is_file()
    assert (save_dir / "dashboard" / "confusion_matrix.png").is_file()


def test_each_logger_gets_its_own_run_in_one_process(tmp_path):
    first = KDWandbLogger(save_dir=str(tmp_path / "a"))
    second = KDWandbLogger(save_dir=str(tmp_path / "b"))
    a, b = first.experiment, second.experiment
    assert a.id != b.id and a.id in loggers._OWNED_RUNS


def test_a_resumed_logger_continues_the_run_id_offline_and_only_before_its_run_starts(tmp_path):
    first = KDWandbLogger(save_dir=str(tmp_path), mode="offline")
    run_id = first.experiment.id
    first.experiment.finish()
    again = KDWandbLogger(save_dir=str(tmp_path), mode="offline")
    again.resume_run(run_id)
    assert again.experiment.id == run_id and again.version == run_id
    with pytest.raises(RuntimeError, match=f"run {run_id!r} has already started"):
        again.resume_run("other")
    again.experiment.finish()
    # Two offline directories of the one run: `wandb sync` uploads both onto it.
    parts = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" appended by wandb when both started within the same second.
    ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", p.name).group(1) for p in parts]
    assert ids == [run_id, run_id], parts
    assert {read_run(f).run_id for f in run_files(tmp_path)} == {run_id}


# ---------------------------------------------------------------------------------------------
# What a W&B user expects: per-step loss and lr, the best validation accuracy, names, lineage


def test_loss_and_lr_per_step_and_the_best_val_acc_in_the_summary(tmp_path):
    torch.manual_seed(0)
    module = ClassifierModule(TEACHER_NET, 4, SHAPE, lr_schedule=OneCycle())
    logger = KDWandbLogger(save_dir=str(tmp_path), name="steps", project="kd-tests")
    trainer = L.Trainer(
        max_epochs=3,
        limit_train_batches=6,
        log_every_n_steps=2,
        logger=logger,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(module, IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=64, val_size=64))
    run = only_run(tmp_path)
    # Every second step (log_every_n_steps=2): the step's loss and the learning rate, on the step axis.
    steps = [row["trainer/global_step"] for row in run.history if "train/loss_step" in row]
    assert steps == [1, 3, 5, 7, 9, 11, 13, 15, 17]
    lrs = [row["train/lr"] for row in run.history if "train/lr" in row]
    assert len(lrs) == 9 and all(is_finite_number(x) for x in lrs) and len(set(lrs)) > 1  # a schedule
    # The summary keeps the best validation accuracy and the lowest loss, not the last epoch's.
    accs = [row["val/acc"] for row in run.history if "val/acc" in row]
    losses = [row["val/loss"] for row in run.history if "val/loss" in row]
    assert run.summary["val/acc"] == {"max": max(accs)} and run.summary["val/loss"] == {"min": min(losses)}
    assert run.metrics["val/acc"] == {"step_metric": "trainer/global_step", "summary": ["max"]}
    assert run.metrics["val/kd_loss"]["summary"] == ["min"]


def test_summaries_are_checked():
    with pytest.raises(ValueError, match=r"`summaries\['val/acc'\]`: 'highest' is not a W&B summary"):
        KDWandbLogger(summaries={"val/acc": "highest"})


def test_kd_names_a_run_by_stage_root_and_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["kd"])
    config = ROOT / "configs/fashion_mnist/specialist.yaml"
    args = [
        "--config",
        str(config),
        "--model.init_args.generalist_ckpt=null",
        "--data.init_args.groups_file=null",
    ]
    args += ["--data.init_args.classes=[0, 1]", "--seed_everything=4", "--trainer.accelerator=cpu"]
    # As the specialist workflow places group 3: its own root, `group3`.
    cli = main([*args, "--trainer.default_root_dir=runs/spec/group3"], run=False)
    wandb_entry, _ = cli.config.trainer.logger
    assert wandb_entry.init_args.name == "specialist-group3-seed4"  # stage (job_type), specialist index, seed
    # A CSVLogger beside it, under the run directory, added by kd.
    (csv,) = [x for x in cli.trainer.loggers if type(x).__name__ == "CSVLogger"]
    assert Path(csv.log_dir).parent == (tmp_path / "runs/spec/group3/seed4/csv")


@pytest.mark.slow  # two members and an ensemble student with a W&B run: ~10 s
def test_the_ensemble_students_lineage_lists_every_member_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    members = []
    for k in range(2):
        torch.manual_seed(k)
        _, save_dir = fit(tmp_path, f"member_{k}", ClassifierModule(STUDENT_NET, 4, SHAPE), epochs=1)
        members.append(str(save_dir / "checkpoints" / "final.ckpt"))
        wandb.finish()
    teacher = Ensemble(checkpoints=members, input_shape=SHAPE)
    student = DistillationModule(STUDENT_NET, 4, SHAPE, teacher=teacher)
    _, save_dir = fit(tmp_path, "student", student, [ArtifactLogger()], epochs=1)
    lineage = only_run(save_dir).config["lineage"]
    assert [m["path"] for m in lineage["members"]] == [str(Path(p).resolve()) for p in members]
    assert [m["sha256"] for m in lineage["members"]] == [file_sha256(p) for p in members]
    assert lineage["members"][1]["artifact"] == "model-member_1-checkpoints-final.ckpt"
