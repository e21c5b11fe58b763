"""The main job on Fashion-MNIST: every part of kd-lightning in one run, one table, the pictures.

    python scripts/main_job.py            # or: make demo
    python scripts/main_job.py --force    # recompute finished stages

Stages, each an ordinary ``kd`` call with a shipped config (printed before it runs, with the epochs of
this job's budget), run under ``runs/main_job/`` so that they never overwrite the longer benchmark runs:

1. teacher (teacher.yaml); 2. the student alone (student.yaml); 3. the soft-target cache and the student
distilled from it (distill_cached.yaml); 4. a 3-member ensemble (member.yaml, seeds 0-2) and a student
distilled from it (distill_ensemble.yaml); 5. the teacher as generalist: its validation confusions
clustered into class groups (``kd validate --config generalist.yaml``), one specialist per group
(specialist.yaml) and their KL combination.

A finished stage is reused. Arguments after ``--`` go to every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from kd_lightning.costs import forward_flops
from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.ensemble import Ensemble, classification_metrics, predict_logits
from kd_lightning.modules import load_teacher
from kd_lightning.specialists import load_specialist
from kd_lightning.workflows.members import train_members
from kd_lightning.workflows.specialists import format_report, train_specialists
from kd_lightning.workflows.stage import own_argv, run_stage, working_directory

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
# This job's budget (epochs): the whole job within 15 minutes on a 2-core CPU.
EPOCHS = {"teacher": 5, "student": 8, "member": 4, "specialist": 1}
MEMBERS = 3


def _say(config: str, args: list[str], workdir: Path, verb: str = "fit") -> None:
    extra = " ".join(shlex.quote(a) for a in args)
    path = os.path.relpath(CONFIGS / config, workdir)
    print(f"\n=== (cd {workdir} && kd {verb} --config {path} {extra})", flush=True)


def _stage(name: str, config: str, workdir: Path, args: list[str], force: bool):
    _say(config, args, workdir)
    return run_stage(name, CONFIGS / config, workdir, args, force)


def _flops(checkpoint: str) -> int:
    net = load_teacher(checkpoint)
    return forward_flops(net.net, net.input_shape)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "main_job"), help="where the runs go")
    parser.add_argument("--force", action="store_true", help="recompute stages that already finished")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every stage, after --")
    args = parser.parse_args()
    wd, ov, force = Path(args.workdir).resolve(), list(args.overrides), args.force
    wd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict] = []

    def row(name: str, acc: float, params: int, flops: int, seconds: float) -> None:
        rows.append(
            {"model": name, "test_acc": acc, "params": params, "flops": flops, "train_seconds": seconds}
        )

    epochs = lambda stage: [f"--trainer.max_epochs={EPOCHS[stage]}"]  # noqa: E731
    teacher = _stage("teacher (CNN)", "teacher.yaml", wd, [*epochs("teacher"), *ov], force)
    row(
        "teacher: SmallCNN", teacher.test_acc, teacher.params, _flops(teacher.checkpoint), teacher.fit_seconds
    )
    alone = _stage("student alone", "student.yaml", wd, [*epochs("student"), *ov], force)
    mlp_flops = _flops(alone.checkpoint)
    row("student alone: MLP 800-800", alone.test_acc, alone.params, mlp_flops, alone.fit_seconds)
    cached = _stage("distilled (cache)", "distill_cached.yaml", wd, [*epochs("student"), *ov], force)
    row(
        "student distilled from the teacher (cached)",
        cached.test_acc,
        cached.params,
        mlp_flops,
        cached.fit_seconds,
    )

    print(
        f"\n=== ensemble: {MEMBERS} x member.yaml (scripts/train_members.py --members {MEMBERS})", flush=True
    )
    members = train_members(
        CONFIGS / "member.yaml", range(MEMBERS), "runs/fashion_mnist/members/member", wd,
        overrides=[*epochs("member"), *ov], force=force,
    )  # fmt: skip
    checkpoints = [m.checkpoint for m in members]
    ensemble = Ensemble(checkpoints=checkpoints)
    dm = IndexedDataModule(FashionMNIST(), eval_batch_size=1000, val_size=5000)
    dm.setup("test")
    ens_acc = classification_metrics(*predict_logits(ensemble, dm.test_dataloader()))["acc"]
    member_flops = _flops(members[0].checkpoint)
    row("ensemble member: MLP 512-512 (mean of 3)", sum(m.test_acc for m in members) / MEMBERS,
        members[0].params, member_flops, sum(m.fit_seconds for m in members) / MEMBERS)  # fmt: skip
    row(f"ensemble of {MEMBERS} members", ens_acc, MEMBERS * members[0].params, MEMBERS * member_flops,
        sum(m.fit_seconds for m in members))  # fmt: skip
    teacher_arg = "--model.init_args.teacher.init_args.checkpoints=[" + ",".join(checkpoints) + "]"
    ens_student = _stage(
        "distilled from the ensemble",
        "distill_ensemble.yaml",
        wd,
        [*epochs("member"), teacher_arg, *ov],
        force,
    )
    row("student distilled from the ensemble: MLP 512-512", ens_student.test_acc, ens_student.params,
        member_flops, ens_student.fit_seconds)  # fmt: skip

    generalist = teacher.checkpoint
    groups = wd / "runs" / "fashion_mnist" / "generalist" / "groups.json"
    if force or not groups.is_file() or groups.stat().st_mtime < Path(generalist).stat().st_mtime:
        from kd_lightning.cli import main as kd

        validate = ["--config", str(CONFIGS / "generalist.yaml"), "--ckpt_path", generalist, *ov]
        _say("generalist.yaml", validate[2:], wd, "validate")  # --ckpt_path: the teacher's checkpoint
        with working_directory(wd), own_argv():
            kd(["validate", *validate])
    print("\n=== specialists: python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml "
          f"--evaluate -- --trainer.max_epochs={EPOCHS['specialist']}", flush=True)  # fmt: skip
    spec = train_specialists(
        CONFIGS / "specialist.yaml", workdir=wd, evaluate=True, force=force,
        overrides=[f"--trainer.max_epochs={EPOCHS['specialist']}", *ov],
    )  # fmt: skip
    print("\n" + format_report(spec["report"]))
    print(f"Table 4 picture: {spec['picture']}")
    report = spec["report"]
    spec_seconds = sum(s.fit_seconds for s in spec["specialists"])
    spec_params = teacher.params + sum(
        sum(p.numel() for p in load_specialist(s.checkpoint).net.parameters()) for s in spec["specialists"]
    )
    row(f"generalist + {len(spec['specialists'])} specialists (KL combination)", report["acc"]["kl"], spec_params,
        int(report["cost"] * _flops(generalist)), spec_seconds)  # fmt: skip
    wall = time.perf_counter() - start

    print("\nFashion-MNIST test accuracy (10,000 test images); training time = fit seconds on this machine\n")
    print("| model | test acc (%) | parameters | MFLOPs / example | training time (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {100 * r['test_acc']:.2f} | {r['params']:,} | {r['flops'] / 1e6:.2f} | "
            f"{r['train_seconds']:.0f} |"
        )
    print(f"\nclass groups: {report['named_groups']}")
    print(
        f"generalist alone {100 * report['acc']['generalist']:.2f}% -> with specialists {100 * report['acc']['kl']:.2f}%"
    )
    pictures = sorted(str(p.relative_to(wd)) for p in wd.rglob("*.png") if "wandb" not in p.parts)
    print("pictures:\n  " + "\n  ".join(pictures))
    print(f"wall time: {wall:.0f} s")
    (wd / "main_job.json").write_text(json.dumps({"rows": rows, "wall_seconds": round(wall, 1)}, indent=2))


if __name__ == "__main__":
    main()
