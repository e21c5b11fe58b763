"""The `kd` command: help, every shipped YAML parses, and the Fashion-MNIST configs run (tiny settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from kd_lightning.callbacks.run_identity import run_name
from kd_lightning.cli import main
from kd_lightning.datamodules import FashionMNIST
from kd_lightning.loggers import KDWandbLogger
from kd_lightning.workflows.members import train_members

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.accelerator=cpu",
]


def kd_executable() -> str:
    exe = Path(sys.executable).with_name("kd")
    assert exe.is_file(), (
        f"the console script `kd` is not installed beside {sys.executable}; run `make setup`"
    )
    return str(exe)


def test_kd_help_lists_subcommands():
    out = subprocess.run([kd_executable(), "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("fit", "validate", "test", "predict", "stage", "members", "specialists", "summary"):
        assert sub in out
    out = subprocess.run(
        [kd_executable(), "fit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--print_config" in out and "--model" in out and "--data" in out


def test_configs_exist():
    assert len(CONFIGS) >= 3 and {p.name for p in CONFIGS} >= {"teacher.yaml", "student.yaml", "distill.yaml"}


@pytest.fixture(scope="module")
def member_checkpoints(tmp_path_factory):
    """Four tiny members of member.yaml (trained once, on first use), as the ensemble configs expect them."""
    made: list[Path] = []

    def make() -> Path:
        if not made:
            if not FashionMNIST().available():
                pytest.skip("Fashion-MNIST files missing: run `make data`")
            work = tmp_path_factory.mktemp("members")
            out = "runs/fashion_mnist/members/member"
            train_members(ROOT / "configs/fashion_mnist/member.yaml", range(4), out, work, overrides=TINY)
            made.append(work / out)
        return made[0]

    return make


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config", "--config", str(config)])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "model:" in printed and "data:" in printed
    # One run, one directory: no config spells a checkpoint or log directory of its own (kd derives them).
    assert "dirpath: null" in printed or "ModelCheckpoint" not in printed
    assert ("save_dir: null" in printed or "logger: false" in printed) and "overwrite: false" in printed


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_yaml_builds_a_working_model(config, tmp_path, monkeypatch, member_checkpoints):
    """Instantiate each config (teacher checkpoints are not needed to build a student) and run one step."""
    monkeypatch.chdir(tmp_path)
    text = config.read_text()
    no_files = ["--model.init_args.teacher_ckpt=null"] if "teacher_ckpt:" in text else []
    teacher_of_files = "kd_lightning.ensemble.Ensemble" in text or "SpecialistTeacher" in text
    if "generalist_ckpt:" in text and not teacher_of_files:  # a specialist: no generalist, its group inline
        no_files += [
            "--model.init_args.generalist_ckpt=null",
            "--data.init_args.groups_file=null",
            "--data.init_args.classes=[0, 1]",
        ]
    if "members/member/member_" in text:  # an ensemble: its members must exist
        (tmp_path / "runs/fashion_mnist/members").mkdir(parents=True)
        (tmp_path / "runs/fashion_mnist/members/member").symlink_to(member_checkpoints())
    elif (
        teacher_of_files
    ):  # other ensembles' members, a generalist and specialists: the student is built alone
        no_files.append("--model.init_args.teacher=null")
    if "kd_lightning.datamodules.ImageFolder" in text:  # a few pictures where the config looks; no download
        root = tmp_path / yaml.safe_load(text)["data"]["init_args"]["source"]["init_args"]["root"]
        for name in ("a", "b"):
            (root / "train" / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "train" / name / "0.png")
        net = "student" if "student:" in text else "net"
        (tmp_path / "no_download.yaml").write_text(
            f"model: {{init_args: {{{net}: {{init_args: {{weights: null}}}}}}}}\n"
        )
        no_files += ["--config", str(tmp_path / "no_download.yaml")]
    cli = main(["--config", str(config), *no_files, *TINY], run=False)
    model, data = cli.model, cli.datamodule
    assert model.num_classes == data.num_classes and tuple(model.input_shape) == tuple(data.input_shape)
    x = torch.randn(2, *data.input_shape)
    model.train()
    logits = model(x)
    # A specialist outputs its group's classes plus the dustbin; every other model the full label space.
    assert logits.shape == (2, getattr(model, "num_outputs", data.num_classes))
    if any(p.requires_grad for p in model.parameters()):  # an ensemble only evaluates
        logits.sum().backward()
    # The run directory is <default_root_dir>/seed<seed>; checkpoints and logs derive from it.
    seed = yaml.safe_load(text)["seed_everything"]
    run_dir = tmp_path / yaml.safe_load(text)["trainer"]["default_root_dir"] / f"seed{seed}"
    assert Path(cli.trainer.default_root_dir).resolve() == run_dir.resolve()
    wandb = [x for x in cli.trainer.loggers if isinstance(x, KDWandbLogger)]
    assert [Path(x.save_dir) for x in wandb] == [run_dir.resolve()] or not cli.trainer.loggers
    entries = (
        cli.config.trainer.logger
        if isinstance(cli.config.trainer.logger, list)
        else [cli.config.trainer.logger]
    )
    wandb_entries = [
        x for x in entries if isinstance(x, Namespace) and x.class_path.endswith("KDWandbLogger")
    ]
    # <stage>-<root>-seed<seed>, the stage (job_type) left out when the root's name starts with it.
    assert [x.init_args.name for x in wandb_entries] == [
        run_name(run_dir.parent.name, seed, x.init_args.get("job_type")) for x in wandb_entries
    ]
    assert all(x.init_args.name.endswith(f"{run_dir.parent.name}-seed{seed}") for x in wandb_entries)
    # A CSVLogger (metrics.csv beside W&B) writes under the run directory too.
    csv = [x for x in cli.trainer.loggers if isinstance(x, CSVLogger)]
    assert all(Path(x.save_dir).resolve().is_relative_to(run_dir.resolve()) for x in csv)
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert {Path(c.dirpath) for c in checkpoints if c.dirpath} <= {(run_dir / "checkpoints").resolve()}
    if config.name != "ensemble.yaml":  # every config that trains: final.ckpt, and last.ckpt every N steps
        # The stage's model: final.ckpt, or the best epoch of a monitored metric (early stopping).
        assert any((c.filename == "final" or c.monitor) and c.save_last for c in checkpoints)
        assert any(c.save_last and c.save_top_k == 0 and c._every_n_train_steps > 0 for c in checkpoints)


needs_fmnist = pytest.mark.skipif(
    not FashionMNIST().available(), reason="Fashion-MNIST files missing: run `make data`"
)


@needs_fmnist
def test_fashion_mnist_configs_run_end_to_end(tmp_path, monkeypatch):
    """teacher.yaml then distill.yaml, as shipped (only shortened): the student reads the teacher's checkpoint."""
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "fashion_mnist"
    main(["fit", "--config", str(cfg / "teacher.yaml"), *TINY])
    ckpt = tmp_path / "runs/fashion_mnist/teacher/seed0/checkpoints/final.ckpt"
    assert ckpt.is_file()
    cli = main(["fit", "--config", str(cfg / "distill.yaml"), *TINY])
    assert cli.model.teacher is not None and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    # A second run in the same directory works (the saved config is overwritten, not refused).
    main(["fit", "--config", str(cfg / "distill.yaml"), *TINY])
    test = main(
        [
            "test",
            "--config",
            str(cfg / "distill.yaml"),
            "--ckpt_path",
            str(tmp_path / "runs/fashion_mnist/distill/seed1/checkpoints/final.ckpt"),
            *TINY,
        ]
    )
    assert 0.0 <= float(test.trainer.callback_metrics["test/agreement"]) <= 1.0


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # jsonargparse re-raises instantiation errors as ValueError with the original message inside.
    with pytest.raises((FileNotFoundError, ValueError), match="`teacher_ckpt`: no checkpoint file at"):
        main(["--config", str(ROOT / "configs/fashion_mnist/distill.yaml"), *TINY], run=False)


def test_bad_temperature_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--config",
        str(ROOT / "configs/fashion_mnist/distill.yaml"),
        "--model.init_args.teacher_ckpt=null",
    ]
    with pytest.raises(ValueError, match="temperature"):
        main([*args, "--model.init_args.objective.init_args.temperature=0", *TINY], run=False)
    with pytest.raises(ValueError, match="hard_weight"):
        main([*args, "--model.init_args.objective.init_args.hard_weight=1.5", *TINY], run=False)


def test_data_dir_without_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        FashionMNIST(data_dir=str(tmp_path), download=False).prepare()
