"""The shipped SLURM job files, submitted for real with sbatch to a one-node cluster on loopback.

The set-up (scripts/slurm/setup_local_cluster.sh) installs Debian's SLURM packages and starts munged,
slurmctld and slurmd. It needs root; without root, or when apt cannot install the packages, every test
here is skipped with that reason. Job files are parametrised from the outside only: sbatch options
(--chdir, --ntasks-per-node, --gres=none, --array, --cpus-per-task) and `kd` arguments after the
script (tiny epochs and batches, no lr schedule for 4 steps, CPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=32",
    "--data.init_args.eval_batch_size=64",
    "--model.init_args.lr_schedule=null",  # a schedule over 4 steps would only add noise
]
CPU_TASKS = ["--gres=none", "--cpus-per-task=1", "--nodes=1"]
TEACHER_CKPT = Path("runs/fashion_mnist/teacher/seed0/checkpoints/final.ckpt")
DISTILL_RUN = Path("runs/fashion_mnist/distill/seed1")
DISTILL_CKPT = DISTILL_RUN / "checkpoints" / "final.ckpt"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SKIPPED LOUDLY: real-SLURM tests need root to install and start slurmctld/slurmd/munged")
    proc = subprocess.run(["bash", str(SLURM / "setup_local_cluster.sh")], capture_output=True, text=True)
    if proc.returncode == 3:
        pytest.skip(f"SKIPPED LOUDLY: apt-get could not install SLURM: {proc.stderr[-2000:]}")
    assert proc.returncode == 0, f"the local SLURM cluster did not start:\n{proc.stdout}\n{proc.stderr}"


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    # A rendezvous left in os.environ by an earlier in-process DDP test must not reach the jobs.
    stale = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
    stale.add("WANDB_SERVICE")  # the W&B service of this pytest process, not the job's own
    return {
        **{k: v for k, v in os.environ.items() if k not in stale},
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "KD_REPO": str(ROOT),
        "WANDB_MODE": "offline",
    }


def sbatch(job: str, workdir: Path, *options: str, args: list[str] = TINY) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", *CPU_TASKS, *options, str(SLURM / job), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def states(job_id: str) -> list[dict[str, str]]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait(job_id: str, timeout: float = 300) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = states(job_id)
        # COMPLETING: the job's processes ended but slurmd is still cleaning up; its final state follows.
        busy = ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING")
        if jobs and all(j["JobState"] not in busy for j in jobs):
            return jobs
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {states(job_id)}")


def logs(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(workdir.glob("*.out")))


@pytest.fixture(scope="module")
def teacher_and_distill(cluster, tmp_path_factory):
    """A 2-task teacher job, then a 2-task distillation job that depends on it."""
    work = tmp_path_factory.mktemp("pipeline")
    teacher = sbatch("teacher.sbatch", work, "--ntasks-per-node=2")
    distill = sbatch("distill.sbatch", work, "--ntasks-per-node=2", f"--dependency=afterok:{teacher}")
    return work, wait(teacher), wait(distill)


def test_two_task_teacher_and_distillation_jobs(teacher_and_distill):
    work, teacher, distill = teacher_and_distill
    text = logs(work)
    assert [j["JobState"] for j in teacher + distill] == ["COMPLETED", "COMPLETED"], text[-4000:]
    assert "kd-distill: job" in text and "on 1 node(s) x 2 task(s)" in text
    assert text.count("All distributed processes registered. Starting with 2 processes") == 2
    ckpt = torch.load(work / DISTILL_CKPT, weights_only=False)
    # 4 batches per rank, 1 epoch: 4 optimizer steps of the 2-process DDP run.
    assert ckpt["global_step"] == 4 and not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert "TeacherPlacement" in str(ckpt.get("callbacks", {})) or "TeacherPlacement" in text


def test_two_task_array_of_ensemble_members(cluster, tmp_path):
    job = sbatch("members.sbatch", tmp_path, "--array=0-1")
    jobs = wait(job)
    assert sorted(j["JobState"] for j in jobs) == ["COMPLETED", "COMPLETED"], logs(tmp_path)[-4000:]
    text = logs(tmp_path)
    assert "kd-members: member 0" in text and "kd-members: member 1" in text
    ckpts = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("member_*/**/*.ckpt"))
    members = {p.parts[p.parts.index(next(x for x in p.parts if x.startswith("member_")))] for p in ckpts}
    assert members == {"member_0", "member_1"}, ckpts


def test_preempted_job_requeues_resumes_and_ends_at_the_same_step(teacher_and_distill, tmp_path):
    work = teacher_and_distill[0]
    longer = [*TINY, "--trainer.max_epochs=4", "--trainer.limit_train_batches=40"]
    runs = {}
    for name in ("plain", "preempted"):
        (tmp_path / name / TEACHER_CKPT.parent).mkdir(parents=True)
        shutil.copy(work / TEACHER_CKPT, tmp_path / name / TEACHER_CKPT)
        runs[name] = sbatch("distill.sbatch", tmp_path / name, "--ntasks-per-node=1", args=longer)
    # Signal once training is under way (the first epoch's checkpoint exists), as a scheduler would.
    first_epoch = tmp_path / "preempted" / DISTILL_CKPT
    deadline = time.monotonic() + 240
    while not first_epoch.exists():
        assert time.monotonic() < deadline, logs(tmp_path / "preempted")[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", runs["preempted"]], check=True)
    # slurmctld holds a requeued job for 120 s (BeginTime); release it as soon as it is requeued.
    settling = ("RUNNING", "COMPLETING", "REQUEUED")  # still the first run, or on its way back to the queue
    while (job := states(runs["preempted"])[0]).get("Restarts") != "1" or job["JobState"] in settling:
        assert time.monotonic() < deadline, logs(tmp_path / "preempted")[-3000:]
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={runs['preempted']}", "StartTime=now"], check=False)
    plain, preempted = wait(runs["plain"]), wait(runs["preempted"])
    text = logs(tmp_path / "preempted")
    assert plain[0]["JobState"] == preempted[0]["JobState"] == "COMPLETED", text[-4000:]
    assert preempted[0]["Restarts"] == "1" and "restart 1" in text
    assert list((tmp_path / "preempted" / DISTILL_RUN).glob("hpc_ckpt_*.ckpt"))
    # The requeued job (--ckpt_path last) resumes from the newest checkpoint: hpc_ckpt_1.ckpt, or last.ckpt
    # when the SIGTERM of Lightning's own `scontrol requeue` stopped the run after it (RunIdentity saves then).
    (restored,) = re.findall(r"Restored all states from the checkpoint at (\S+)", text)
    newest = "last.ckpt" if "SIGTERM: saved" in text else "hpc_ckpt_1.ckpt"
    assert Path(restored).name == newest, text[-4000:]
    steps = {
        name: torch.load(tmp_path / name / DISTILL_CKPT, weights_only=False)["global_step"] for name in runs
    }
    assert steps["preempted"] == steps["plain"] == 4 * 40


def test_job_preempted_with_sigterm_alone_resumes_from_its_last_checkpoint(teacher_and_distill, tmp_path):
    """`scontrol requeue` is what preemption by requeue does: SLURM sends SIGTERM (no SIGUSR1) to every step,
    SIGKILL after KillWait (30 s), and queues the job again. The run saves last.ckpt where SIGTERM stopped it;
    the requeued job's `--ckpt_path last` resumes there and ends at the uninterrupted run's step."""
    work = teacher_and_distill[0]
    longer = [*TINY, "--trainer.max_epochs=4", "--trainer.limit_train_batches=40"]
    (tmp_path / TEACHER_CKPT.parent).mkdir(parents=True)
    shutil.copy(work / TEACHER_CKPT, tmp_path / TEACHER_CKPT)
    job = sbatch("distill.sbatch", tmp_path, "--ntasks-per-node=1", args=longer)
    deadline = time.monotonic() + 240
    while not (tmp_path / DISTILL_CKPT).exists():  # training is under way: the first epoch is saved
        assert time.monotonic() < deadline, logs(tmp_path)[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # into the second epoch, away from the epoch's own checkpoint
    subprocess.run(["scontrol", "requeue", job], check=True)
    settling = ("RUNNING", "COMPLETING", "REQUEUED")  # the first run still ending, or on its way back
    while (state := states(job)[0]).get("Restarts") != "1" or state["JobState"] in settling:
        assert time.monotonic() < deadline, logs(tmp_path)[-3000:]
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)  # 120 s hold
    (done,) = wait(job)
    text = logs(tmp_path)
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "1" and "restart 1" in text, text[-4000:]
    assert not list((tmp_path / DISTILL_RUN).glob("hpc_ckpt_*.ckpt"))  # no SIGUSR1 was involved
    last = (tmp_path / DISTILL_RUN / "checkpoints" / "last.ckpt").resolve()
    assert f"Restored all states from the checkpoint at {last}" in text, text[-4000:]
    # The first run saved last.ckpt where SIGTERM stopped it (often at an epoch's end: validation and the
    # dashboard take most of an epoch here), and the requeued job started from that step, not from 0.
    (stopped_at,) = [int(s) for s in re.findall(r"SIGTERM: saved \S+last\.ckpt at global step (\d+)", text)]
    (resumed_at,) = [int(s) for s in re.findall(r"Resuming at global step (\d+)", text)]
    assert 40 <= stopped_at == resumed_at < 160 and "Exited with exit code 143" in text, text[-4000:]
    assert torch.load(tmp_path / DISTILL_CKPT, weights_only=False)["global_step"] == 4 * 40
