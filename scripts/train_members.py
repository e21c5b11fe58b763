"""Train the members of an ensemble from one config: N runs that differ by seed (or by width).

    python scripts/train_members.py --config configs/fashion_mnist/member.yaml --members 4   # 0..3, in turn
    python scripts/train_members.py --config configs/fashion_mnist/member.yaml --member 2    # one (array task)
    python scripts/train_members.py --config configs/fashion_mnist/member.yaml --members 3 \\
        --vary model.init_args.net.init_args.hidden "[128,128]" "[256,256]" "[512,512]"       # one width each

Member ``k`` is ``kd fit --config CONFIG --seed_everything=SEED_BASE+k`` with its root, checkpoint and logs
under ``OUT/member_<k>/`` (default ``OUT``: ``runs/<dataset>/members/<config name>``), followed by
``kd test`` (:func:`kd_lightning.workflows.members.train_members`, also ``kd members``); a finished
member is reused unless ``--force``. ``--member K`` is what one task of a SLURM
array job runs (scripts/slurm/members.sbatch). Arguments after ``--`` go to every member, e.g.
``-- --trainer.max_epochs=1``. At the end the script prints each member's test accuracy and the
``kd test`` command that evaluates them as an ensemble.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from kd_lightning.workflows.members import train_members
from kd_lightning.workflows.stage import format_table

ROOT = Path(__file__).resolve().parents[1]


def default_out(config: Path) -> Path:
    return Path("runs") / config.parent.name / "members" / config.stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="kd config of one member")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--members", type=int, help="train members 0 .. N-1 one after another")
    which.add_argument("--member", type=int, help="train member K only (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument(
        "--out", type=Path, help="members' directory (default runs/<dataset>/members/<config>)"
    )
    parser.add_argument(
        "--workdir", default=str(ROOT), help="where relative paths resolve (default: the repo)"
    )
    parser.add_argument("--seed-base", type=int, default=0, help="member k is seeded SEED_BASE + k")
    parser.add_argument("--vary", nargs="+", metavar=("KEY", "VALUE"), help="member k gets --KEY=VALUE_k")
    parser.add_argument("--force", action="store_true", help="retrain finished members")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every member, after --")
    args = parser.parse_args(argv)

    if args.members is not None and args.members < 1:
        parser.error(f"--members must be >= 1, got {args.members}")
    if args.member is not None and args.member < 0:
        parser.error(f"--member must be >= 0, got {args.member}")
    if args.vary is not None and len(args.vary) < 2:
        parser.error("--vary needs a KEY and at least one VALUE")
    vary = (args.vary[0], args.vary[1:]) if args.vary else None
    members = range(args.members) if args.members is not None else [args.member]
    if vary is not None and max(members) >= len(vary[1]):
        parser.error(f"--vary {vary[0]} has {len(vary[1])} values, but member {max(members)} needs one")
    config = args.config.resolve()
    if not config.is_file():
        parser.error(f"--config: no file at {str(args.config)!r}")
    out = args.out or default_out(config)

    results = train_members(
        config, members, out, args.workdir, args.seed_base, vary, args.overrides, args.force, config.stem
    )
    print()
    print(format_table(results))
    checkpoints = "[" + ",".join(r.checkpoint for r in results) + "]"
    print(
        "\nevaluate them as an ensemble:\n  kd test --config configs/fashion_mnist/ensemble.yaml "
        f"--model.init_args.checkpoints={shlex.quote(checkpoints)}"
    )


if __name__ == "__main__":
    main()
