"""Launch settings: clear errors for what cannot run as asked, and `kd fit` under torchrun (two "nodes")."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import kd_env, write_tiny_configs

from kd_lightning.cli import main
from kd_lightning.launch import (
    check_devices,
    check_precision,
    check_slurm_tasks,
    check_trainer_arguments,
    count_devices,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fashion_mnist" / "distill.yaml")
NO_TEACHER = ["--model.init_args.teacher_ckpt=null", "--trainer.accelerator=cpu"]


def test_precision_the_accelerator_cannot_do():
    with pytest.raises(ValueError, match=r"`trainer.precision`: '16-mixed' cannot run on accelerator 'cpu'"):
        check_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match="`trainer.precision`: 16 cannot run on accelerator 'cpu'"):
        check_precision(16, "cpu")
    with pytest.raises(ValueError, match=r"needs a GPU with bfloat16.*Expected '16-mixed'.*got 'bf16-mixed'"):
        check_precision("bf16-mixed", "cuda", bf16_supported=False)
    # What does run: bf16 on CPU, 16-true on CPU (slow, but real fp16), fp16 and bf16 on a capable GPU.
    for precision, accelerator in [
        ("bf16-mixed", "cpu"),
        ("16-true", "cpu"),
        ("32-true", "cpu"),
        (None, "cpu"),
        ("16-mixed", "cuda"),
    ]:
        check_precision(precision, accelerator, bf16_supported=True)
    assert check_precision("bf16", "cuda", bf16_supported=True) == "bf16-mixed"


def test_more_devices_than_available():
    with pytest.raises(
        ValueError, match=r"`trainer.devices`: 4 asks for 4 cpu processes.*Expected at most 2, got 4"
    ):
        check_devices(4, "cpu", available=2)
    with pytest.raises(ValueError, match=r"`trainer.devices`: '0,1,2' asks for 3 cuda.*has 2 cuda devices"):
        check_devices("0,1,2", "cuda", available=2)
    # Under SLURM or torchrun a CPU task is one process whatever cores it sees; GPUs still count.
    assert check_devices(4, "cpu", available=1, external_launcher=True) == 4
    assert [count_devices(d, "cuda", 8) for d in ("auto", -1, "-1", [0, 1], "0,1", "3", 2)] == [
        8,
        8,
        8,
        2,
        2,
        3,
        2,
    ]
    assert count_devices("auto", "cpu", 2) == 1
    with pytest.raises(ValueError, match="`trainer.devices`: expected a positive integer.*got 'many'"):
        count_devices("many", "cpu", 2)


def test_slurm_task_count_must_match_devices_times_nodes():
    env = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "kd", "SLURM_STEP_ID": "0"}
    with pytest.raises(
        ValueError, match=r"= 2 x 1 = 2 processes, but the SLURM job has 1 task.*SLURM_NTASKS=2"
    ):
        check_slurm_tasks(2, 1, env)
    with pytest.raises(ValueError, match=r"= 2 x 2 = 4 processes.*has 2 task"):
        check_slurm_tasks(2, 2, {**env, "SLURM_NTASKS": "2"})
    with pytest.raises(ValueError, match="Start the command with `srun`"):
        check_slurm_tasks(2, 1, {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "kd"})
    check_slurm_tasks(2, 2, {**env, "SLURM_NTASKS": "4"})
    check_slurm_tasks(
        2, 1, {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}
    )  # salloc: not SLURM's ranks
    check_slurm_tasks(2, 1, {})


def test_kd_refuses_bad_launch_settings_before_building_the_trainer(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="`trainer.precision`: '16-mixed' cannot run on accelerator 'cpu'"):
        main(["--config", CONFIG, *NO_TEACHER, "--trainer.precision=16-mixed"], run=False)
    with pytest.raises(ValueError, match="`trainer.devices`: .999. asks for 999 cpu processes"):
        main(["--config", CONFIG, *NO_TEACHER, "--trainer.devices=999"], run=False)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "kd", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="SLURM job has 1 task"):
        main(["--config", CONFIG, *NO_TEACHER, "--trainer.devices=2"], run=False)
    check_trainer_arguments({"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun agents, two `kd` processes: about 30 s on 2 busy cores
def test_kd_fit_under_torchrun_on_two_nodes_of_one_machine(tmp_path):
    config, _ = write_tiny_configs(tmp_path)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(Path(sys.executable).with_name("kd")),
                "fit",
                "--config",
                str(config),
                "--trainer.strategy=ddp",
                "--trainer.devices=1",
                "--trainer.num_nodes=2",
            ],
            cwd=tmp_path,
            env=kd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "Starting with 2 processes" in "\n".join(outputs)
    ckpt = torch.load(tmp_path / "run" / "final.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6  # 192 training samples / (2 processes x 32) per epoch, 2 epochs
