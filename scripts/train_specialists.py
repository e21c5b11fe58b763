"""Train the specialists of a groups file (Hinton et al. 2015, section 5), all of them or one.

    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml            # every group
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --group 1  # one group
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --count    # how many
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --evaluate # then score

Each specialist is ``kd fit --config CONFIG --data.init_args.group=G [overrides]`` run in-process
(:func:`kd_lightning.workflows.specialists.train_specialists`, also ``kd specialists``); its checkpoint
is ``OUT/group<G>.ckpt`` with ``OUT/group<G>.json`` beside it (test metrics, command), and a finished
group is reused unless ``--force``. ``--group G`` is what one task of a SLURM array job runs
(scripts/slurm/specialists.sbatch); ``--evaluate`` (after the whole array, or here after training)
combines the generalist with every specialist in ``OUT`` and prints the report. Arguments after ``--``
go to every ``kd`` run, e.g. ``-- --trainer.max_epochs=1 --seed_everything=2``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_lightning.workflows.specialists import count_specialists, format_report, train_specialists


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="a specialist config (kd YAML)")
    parser.add_argument("--group", type=int, help="train only this group (a SLURM array task)")
    parser.add_argument("--groups-file", type=Path, help="override the config's groups file")
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: <default_root_dir>)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="where relative paths resolve")
    parser.add_argument("--count", action="store_true", help="print the number of groups and exit")
    parser.add_argument(
        "--evaluate", action="store_true", help="after training, score generalist + specialists"
    )
    parser.add_argument("--force", action="store_true", help="retrain groups that already finished")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every run, after --")
    args = parser.parse_args()

    if args.count:
        print(count_specialists(args.config, args.groups_file, args.workdir, args.overrides))
        return
    summary = train_specialists(
        args.config,
        group=args.group,
        groups_file=args.groups_file,
        out=args.out,
        workdir=args.workdir,
        evaluate=args.evaluate,
        force=args.force,
        overrides=args.overrides,
    )
    if args.evaluate:
        print("\n" + format_report(summary["report"]))
        print(f"Table 4 picture: {summary['picture']}")


if __name__ == "__main__":
    main()
