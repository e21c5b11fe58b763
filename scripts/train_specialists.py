"""Train the specialists of a groups file (Hinton et al. 2015, section 5), all of them or one.

    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml            # every group
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --group 1  # one group
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --count    # how many
    python scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml --evaluate # then score

Each specialist is ``kd fit --config CONFIG --model.init_args.group=G [overrides]`` run in-process; its
checkpoint is ``OUT/group<G>.ckpt`` with ``OUT/group<G>.json`` beside it (test metrics, command), and
a finished group is reused unless ``--force``. ``--group G`` is what one task of a SLURM array job runs
(scripts/slurm/specialists.sbatch); ``--evaluate`` (after the whole array, or here after training)
combines the generalist with every specialist in ``OUT`` and prints the report. Arguments after ``--``
go to every ``kd`` run, e.g. ``-- --trainer.max_epochs=1 --seed_everything=2``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_lightning.clustering import ClassGroups  # noqa: E402
from kd_lightning.pipeline import working_directory  # noqa: E402
from kd_lightning.plots import plot_specialist_breakdown  # noqa: E402
from kd_lightning.progress import Progress  # noqa: E402

GROUPS_ARG = "--model.init_args.groups_file"
GENERALIST_ARG = "--model.init_args.generalist_ckpt"


@contextmanager
def _cli_argv() -> Iterator[None]:
    """Hide this script's own arguments from LightningCLI, which warns when it sees both."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _override(overrides: Sequence[str], key: str) -> str | None:
    """The value of the last ``key=value`` (or ``key value``) among the kd overrides."""
    value = None
    for i, arg in enumerate(overrides):
        if arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
        elif arg == key and i + 1 < len(overrides):
            value = overrides[i + 1]
    return value


def config_value(config: Path, overrides: Sequence[str], key: str) -> Any:
    """``model.init_args.<key>`` as the config and overrides set it (the overrides win)."""
    value = _override(overrides, f"--model.init_args.{key}")
    if value is not None:
        return None if value == "null" else value
    return ((yaml.safe_load(config.read_text()) or {}).get("model", {}).get("init_args", {})).get(key)


def groups_of(config: Path, overrides: Sequence[str], workdir: Path) -> tuple[Path, ClassGroups]:
    """The groups file a specialist config trains from, read and validated.

    Raises:
        ValueError: the config names no groups file.
    """
    path = config_value(config, overrides, "groups_file")
    if path is None:
        raise ValueError(
            f"`--config` {config}: no model.init_args.groups_file (give it, or `--groups-file`)."
        )
    path = Path(path) if Path(path).is_absolute() else workdir / path
    return path, ClassGroups.load(path)


def train_specialist(
    config: Path, group: int, out: Path, workdir: Path, overrides: Sequence[str] = (), force: bool = False
) -> dict[str, Any]:
    """Fit and test the specialist of ``group``; reuse a finished one run with the same command.

    Returns:
        ``{"group", "checkpoint", "command", "metrics", "fit_seconds", "reused"}``.
    """
    from kd_lightning.cli import main

    args = ["--config", str(config.resolve()), *overrides, f"--model.init_args.group={group}"]
    command = "kd fit " + " ".join(shlex.quote(a) for a in args)
    checkpoint, result_file = out / f"group{group}.ckpt", out / f"group{group}.json"
    if result_file.is_file() and checkpoint.is_file() and not force:
        saved = json.loads(result_file.read_text())
        # Same command and the group still has the same classes (a re-clustered file may not).
        classes = groups_of(config, overrides, workdir)[1].group(group)
        if saved.get("command") == command and saved.get("classes") == classes:
            return {**saved, "reused": True}
    with working_directory(workdir), _cli_argv():
        cli = main([*args, f"--trainer.default_root_dir={out / f'group{group}'}"], run=False)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        cli.trainer.save_checkpoint(checkpoint)  # collective; rank 0 writes
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    result = {
        "group": group,
        "classes": cli.model.group_classes,
        "checkpoint": str(checkpoint.resolve()),
        "command": command,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "dustbin_correction": float(cli.model.dustbin_shift),
        "fit_seconds": round(fit_seconds, 1),
        "reused": False,
    }
    if cli.trainer.is_global_zero:
        result_file.write_text(json.dumps(result, indent=2))
    return result


def evaluate(
    config: Path, out: Path, workdir: Path, overrides: Sequence[str] = (), groups_file: Path | None = None
) -> dict[str, Any]:
    """Test the generalist + every specialist checkpoint in ``out`` on the config's test split.

    Returns:
        The :class:`~kd_lightning.specialists.SpecialistEnsemble` report, plus wall-clock seconds of the
        generalist alone and of the ensemble over the test split.
    """
    from kd_lightning.cli import main
    from kd_lightning.datamodules import IndexedDataModule
    from kd_lightning.modules import load_teacher
    from kd_lightning.specialists import SpecialistEnsemble

    with working_directory(workdir), _cli_argv():
        cli = main(["--config", str(config.resolve()), *overrides, f"{GENERALIST_ARG}=null"], run=False)
        data = cli.datamodule
        generalist = config_value(config, overrides, "generalist_ckpt")
        if generalist is None:
            raise ValueError(f"`--config` {config}: evaluation needs model.init_args.generalist_ckpt.")
        if groups_file is None:
            groups_path, groups = groups_of(config, overrides, workdir)
        else:
            groups_path, groups = groups_file, ClassGroups.load(groups_file)
        checkpoints = [out / f"group{g}.ckpt" for g in range(len(groups.groups))]
        missing = [str(p) for p in checkpoints if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--evaluate: specialists not trained yet: {missing}")
        # The test split as every model sees it: natural sampling, no specialist relabelling.
        plain = IndexedDataModule(
            data.source,
            eval_batch_size=data.eval_batch_size,
            val_size=data.val_size,
            split_seed=data.split_seed,
        )
        ensemble = SpecialistEnsemble(str(generalist), [str(p) for p in checkpoints], str(groups_path))
        # The config's own Trainer (devices, precision, limits), never used for fitting here.
        trainer = cli.trainer
        start = time.perf_counter()
        trainer.test(load_teacher(str(generalist)), plain, verbose=False)
        generalist_seconds = time.perf_counter() - start
        start = time.perf_counter()
        trainer.test(ensemble, plain, verbose=False)
        ensemble_seconds = time.perf_counter() - start
    report = dict(ensemble.report)
    report["named_groups"] = [[groups.class_names[c] for c in g] for g in report["groups"]]
    report["seconds"] = {"generalist": round(generalist_seconds, 2), "ensemble": round(ensemble_seconds, 2)}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown tables: accuracies, conditional accuracies, Table 4, cost."""
    acc, cond = report["acc"], report.get("cond_acc", {})
    lines = [
        "| predictor | test acc (%) | conditional acc (%) |",
        "|---|---:|---:|",
    ]
    labels = {
        "generalist": "generalist alone",
        "kl": "generalist + specialists (KL)",
        "average": "average of specialists",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | {100 * acc[key]:.2f} | {100 * cond.get(key, float('nan')):.2f} |")
    lines += [
        "",
        "| specialists covering the true class | test images | generalist (%) | KL (%) | change (points) | relative (%) |",
    ]
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for row in report["by_cover"]:
        lines.append(
            f"| {row['cover']} | {row['count']} | {100 * row['acc']['generalist']:.2f} | {100 * row['acc']['kl']:.2f} "
            f"| {100 * row['delta']['kl']:+.2f} | {row['relative']['kl']:+.2f} |"
        )
    seconds = report.get("seconds", {})
    lines += [
        "",
        f"inference cost: {report['specialists_per_input']:.2f} specialists per input, "
        f"{report['cost']:.2f}x the generalist's FLOPs"
        + (
            f", {seconds['ensemble'] / max(seconds['generalist'], 1e-9):.2f}x its wall time on the test split"
            if seconds
            else ""
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
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
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.groups_file is not None:
        overrides.append(f"{GROUPS_ARG}={args.groups_file.resolve()}")
    groups_path, groups = groups_of(args.config, overrides, args.workdir)
    if args.count:
        print(len(groups.groups))
        return {"count": len(groups.groups)}
    if args.group is not None:
        groups.group(args.group)  # a clear error for a group the file does not have
    out = args.out
    if out is None:
        root = (
            (yaml.safe_load(args.config.read_text()) or {})
            .get("trainer", {})
            .get("default_root_dir", "runs/specialists")
        )
        out = Path(_override(overrides, "--trainer.default_root_dir") or root)
    out = out if out.is_absolute() else args.workdir / out
    out.mkdir(parents=True, exist_ok=True)

    todo = [args.group] if args.group is not None else list(range(len(groups.groups)))
    results = []
    # One line per finished specialist with the time left (Lightning's bar covers one fit only).
    tracker = Progress(len(todo), desc="specialists", unit="specialist", bar=False, stream=sys.stdout)
    for g in todo:
        names = ", ".join(groups.class_names[c] for c in groups.groups[g])
        print(f"\n=== specialist {g}/{len(groups.groups)}: {names}", flush=True)
        results.append(train_specialist(args.config, g, out, args.workdir, overrides, args.force))
        r = results[-1]
        took = "reused" if r["reused"] else f"{r['fit_seconds']:.0f} s"
        tracker.update(
            note=f"group {g}: test acc over its {len(r['classes']) + 1} labels "
            f"{100 * r['metrics'].get('test/acc', float('nan')):.2f}%, "
            f"dustbin correction {r['dustbin_correction']:+.3f}, {took}"
        )
    summary: dict[str, Any] = {"groups_file": str(groups_path), "specialists": results}
    if args.evaluate:
        report = evaluate(args.config, out, args.workdir, overrides)
        print("\n" + format_report(report))
        summary["report"] = report
        (out / "report.json").write_text(json.dumps(report, indent=2))
        picture = plot_specialist_breakdown(
            report, out / "table4.png", title=f"generalist + {len(groups.groups)} specialists, test split"
        )
        print(f"Table 4 picture: {picture}")
    return summary


if __name__ == "__main__":
    main()
