"""How `kd` introduces itself: help with a description and examples, --version, `python -m kd_lightning`,
network arguments' help without every nn.Module of torch, and errors in two lines naming the argument."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kd_lightning
from kd_lightning.cli import console, main
from kd_lightning.cli_help import summarize_parse_error

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "configs/fashion_mnist/student.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    """Every test starts without KD_DEBUG, and `kd --debug` (which sets it) does not leak out."""
    monkeypatch.setenv("KD_DEBUG", "0")


def run_console(argv: list[str], capsys) -> tuple[int, str, str]:
    """``kd ARGV`` in-process: its exit status (0 when it returns), stdout and stderr."""
    try:
        console(argv)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_describes_the_tool_with_examples(capsys):
    code, out, _ = run_console(["--help"], capsys)
    assert code == 0
    assert "Lightning Trainer command line tool" not in out
    assert out.count("knowledge distillation") >= 1 and "examples:" in out
    for shown in ("kd fit --config", "--ckpt_path last", "distill_cached.yaml", "kd stage", "kd members"):
        assert shown in out
    for shown in ("--version", "--debug", "KD_DEBUG=1", "kd configs [DEST]", "docs/cli.md"):
        assert shown in out
    for sub in ("fit", "validate", "test", "predict", "stage", "members", "specialists", "summary"):
        assert sub in out


def test_version_from_kd_and_python_m():
    """`kd --version` and `python -m kd_lightning --version` print the package's one version."""
    expected = f"kd-lightning {kd_lightning.__version__}"
    kd = Path(sys.executable).with_name("kd")
    for command in ([str(kd), "--version"], [sys.executable, "-m", "kd_lightning", "--version"]):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected, command


def test_python_m_kd_lightning_is_kd():
    """`python -m kd_lightning` runs the same console as `kd`, under the name `kd`."""
    done = subprocess.run(
        [sys.executable, "-m", "kd_lightning", "fit", "--print_config", "--config", str(STUDENT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "kd_lightning.modules.ClassifierModule" in done.stdout
    done = subprocess.run([sys.executable, "-m", "kd_lightning"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout.startswith("usage: kd ")


def test_network_help_does_not_list_every_torch_module(capsys):
    """Before: 1,408 lines, 474 of them nn.Module subclasses of torch, torchvision and torchmetrics."""
    code, out, _ = run_console(["fit", "--model.help", "DistillationModule"], capsys)
    assert code == 0
    assert len(out.splitlines()) < 150, len(out.splitlines())
    assert "torch.nn.Linear" not in out and "torchmetrics" in out  # counted, not listed
    assert "kd_lightning.MLP" in out and "kd_lightning.resnets.CifarResNet" in out
    assert "kd_lightning.ClassifierModule" not in out  # a LightningModule is no network
    # Short lists stay whole: the objectives, and torch's optimizers.
    assert "kd_lightning.HintonKD" in out and "torch.optim.SGD" in out


def test_parse_error_in_two_lines_naming_the_argument(capsys):
    code, _, err = run_console(
        ["fit", "--config", str(STUDENT), "--model.init_args.net.init_args.hiddn=[3]"], capsys
    )
    assert code == 2
    assert "usage:" not in err and len(err.strip().splitlines()) == 2
    assert "model.init_args.net" in err and "hiddn" in err and "KD_DEBUG=1" in err


def test_summarize_parse_error_without_a_key():
    assert summarize_parse_error("Unrecognized arguments: --x\nmore") == "Unrecognized arguments: --x"


def _mobilenet_student(tmp_path: Path) -> Path:
    """A config that names a torchvision constructor as the network: built without the (input_shape,
    num_classes) it is called with, it fails inside the module (no download: weights are not asked for)."""
    config = tmp_path / "mobilenet.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"init_args": {"net": {"class_path": "torchvision.models.mobilenet_v3_small"}}}}
        )
    )
    return config


def test_build_error_in_two_lines_naming_the_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(STUDENT), "--config", str(_mobilenet_student(tmp_path)), *QUIET]
    code, _, err = run_console(argv, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "model.init_args.net (torchvision.models.mobilenet_v3_small)" in lines[0]
    assert "TypeError" in lines[0] and "KD_DEBUG=1" in lines[1]
    assert "Traceback" not in err


def test_wrong_init_value_names_the_network(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(STUDENT), "--model.init_args.net.init_args.hidden=[-3]", *QUIET]
    code, _, err = run_console(argv, capsys)
    assert code == 1 and "building model.init_args.net (kd_lightning.MLP) failed: RuntimeError" in err


def test_missing_data_dir_names_the_source(tmp_path, monkeypatch, capsys):
    """The data are looked for when the fit sets up: still before anything trained, still two lines."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit",
        "--config",
        str(STUDENT),
        f"--data.init_args.source.init_args.data_dir={tmp_path / 'nowhere'}",
        "--trainer.max_epochs=1",
        *QUIET,
    ]
    code, _, err = run_console(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 2, err
    assert (
        "data.init_args.source (kd_lightning.datamodules.FashionMNIST)" in err and "FileNotFoundError" in err
    )


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    """KD_DEBUG=1 or a first argument --debug: the error propagates as raised (the full traceback)."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(STUDENT), "--config", str(_mobilenet_student(tmp_path)), *QUIET]
    with pytest.raises(ValueError, match="MobileNetV3.forward"):
        console(["--debug", *argv])
    monkeypatch.setenv("KD_DEBUG", "1")
    with pytest.raises(ValueError, match="MobileNetV3.forward"):
        console(argv)


def test_library_entry_keeps_the_original_errors(tmp_path, monkeypatch):
    """`main` (scripts, workflows) is not the shell: its errors stay the exceptions raised."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="MobileNetV3.forward"):
        main(["--config", str(STUDENT), "--config", str(_mobilenet_student(tmp_path)), *QUIET], run=False)


def test_kd_configs_copies_the_shipped_configs(tmp_path, capsys):
    dest = tmp_path / "my_configs"
    code, out, _ = run_console(["configs", str(dest)], capsys)
    assert code == 0 and "configs written" in out
    shipped = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml"))
    assert sorted(p.relative_to(dest) for p in dest.rglob("*.yaml")) == shipped
    code, _, err = run_console(["configs", str(dest)], capsys)
    assert code == 1 and "already exist" in err and "--overwrite" in err
    code, _, _ = run_console(["configs", str(dest), "--overwrite"], capsys)
    assert code == 0
    # A copied config runs as the shipped one does (here: parses).
    with pytest.raises(SystemExit) as done:
        main(["fit", "--print_config", "--config", str(dest / "fashion_mnist/teacher.yaml")])
    assert done.value.code in (0, None)
