"""Train the specialists of a groups file (Hinton et al. 2015, section 5) and score their combination.

Specialist ``G`` is the stage ``kd fit --config CONFIG [overrides] --data.init_args.group=G`` followed by
``kd test`` (:func:`~kd_lightning.workflows.stage.run_stage`); its checkpoint is ``OUT/group<G>.ckpt`` with
its record ``OUT/group<G>.json`` beside it (test metrics, command, classes, dustbin correction), and its
run (logs, step-wise checkpoints) lives under ``OUT/group<G>/``. A finished group is reused unless
``force``, as long as the groups file still gives it the same classes. :func:`evaluate_specialists`
combines the generalist with every specialist in ``OUT`` on the config's test split.

The config's values (groups file, generalist, run root) are read the way ``kd`` reads them
(:func:`kd_lightning.cli.parse_config`: the YAML and the overrides merged and type-checked).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
from jsonargparse import Namespace

from kd_lightning.clustering import ClassGroups
from kd_lightning.workflows.stage import StageResult, own_argv, run_stage, working_directory

GROUPS_ARG = "--data.init_args.groups_file"
GENERALIST_ARG = "--model.init_args.generalist_ckpt"


def specialist_config(config: str | Path, overrides: Sequence[str] = ()) -> Namespace:
    """The configuration of ``kd fit --config CONFIG [overrides]``, parsed as ``kd`` parses it, nothing built."""
    from kd_lightning.cli import parse_config

    with own_argv():
        return parse_config(["--config", str(Path(config).resolve()), *overrides])


def groups_of(
    config: str | Path, overrides: Sequence[str] = (), workdir: str | Path = "."
) -> tuple[Path, ClassGroups]:
    """The groups file a specialist config trains from (relative to ``workdir``), read and validated.

    Raises:
        ValueError: the config names no groups file.
    """
    path = specialist_config(config, overrides).data.init_args.groups_file
    if path is None:
        raise ValueError(f"`config` {config}: no data.init_args.groups_file (give it, or `groups_file`).")
    path = Path(path) if Path(path).is_absolute() else Path(workdir) / path
    return path, ClassGroups.load(path)


def count_specialists(
    config: str | Path,
    groups_file: str | Path | None = None,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
) -> int:
    """The number of groups (specialists) of a specialist config: the size of a SLURM array job.

    Args:
        config: a specialist config (``kd`` YAML).
        groups_file: instead of the config's groups file.
        workdir: where relative paths resolve.
        overrides: ``kd`` arguments of every run.

    Returns:
        The number of groups.
    """
    overrides = _with_groups_file(overrides, groups_file)
    return len(groups_of(config, overrides, workdir)[1].groups)


def _with_groups_file(overrides: Sequence[str], groups_file: str | Path | None) -> list[str]:
    extra = [] if groups_file is None else [f"{GROUPS_ARG}={Path(groups_file).resolve()}"]
    return [*overrides, *extra]


def _specialist_details(group: int) -> Callable[[L.LightningModule], dict[str, Any]]:
    """What a specialist's record holds besides its metrics: its group, classes and dustbin correction."""

    def details(model: L.LightningModule) -> dict[str, Any]:
        from kd_lightning.specialists import SpecialistModule

        if not isinstance(model, SpecialistModule):
            raise TypeError(
                f"`config`: a specialist config must build a SpecialistModule, got {type(model).__name__}."
            )
        return {
            "group": group,
            "classes": list(model.group_classes),
            "dustbin_correction": float(model.dustbin_shift),
        }

    return details


def upgrade_record(record_file: Path, name: str) -> bool:
    """Rewrite a specialist record of the format before specialists were stages (no ``name``, ``test_acc``
    or ``params``) in the stage format, so that its finished specialist is reused; ``True`` if rewritten.

    The network's parameter count, which that format lacked, is read from the checkpoint.
    """
    if not record_file.is_file():
        return False
    saved = json.loads(record_file.read_text())
    if "name" in saved or not Path(saved.get("checkpoint", "")).is_file():
        return False
    from kd_lightning.specialists import load_specialist

    net = load_specialist(saved["checkpoint"]).net
    result = StageResult(
        name=name,
        command=saved["command"],
        checkpoint=saved["checkpoint"],
        test_acc=float(saved["metrics"]["test/acc"]),
        params=sum(p.numel() for p in net.parameters()),
        fit_seconds=saved["fit_seconds"],
        metrics=saved["metrics"],
        details={k: saved[k] for k in ("group", "classes", "dustbin_correction")},
    )
    record_file.write_text(json.dumps(result.record(), indent=2))
    return True


def train_specialist(
    config: str | Path,
    group: int,
    out: str | Path,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    force: bool = False,
) -> StageResult:
    """Fit and test the specialist of ``group``; reuse a finished one run with the same command and classes.

    Args:
        config: a specialist config (``kd`` YAML).
        group: the group (an index into the groups file).
        out: directory of ``group<G>.ckpt`` and its record ``group<G>.json`` (relative to ``workdir``).
        workdir: where relative paths resolve.
        overrides: ``kd`` arguments of the run (before ``--data.init_args.group=G``).
        force: retrain even if finished.

    Returns:
        The stage's result; its ``details`` hold ``group``, ``classes`` and ``dustbin_correction``.
    """
    out = (Path(workdir) / out).resolve()  # `out` if absolute
    classes = groups_of(config, overrides, workdir)[1].group(group)
    upgrade_record(out / f"group{group}.json", f"specialist {group}")
    return run_stage(
        f"specialist {group}",
        config,
        workdir,
        [*overrides, f"--data.init_args.group={group}"],
        force,
        checkpoint=out / f"group{group}.ckpt",
        run_args=[f"--trainer.default_root_dir={out / f'group{group}'}"],
        details=_specialist_details(group),
        expect={"classes": classes},
        resume=False,
    )


def evaluate_specialists(
    config: str | Path,
    out: str | Path,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    groups_file: str | Path | None = None,
    split: Literal["val", "test"] = "test",
) -> dict[str, Any]:
    """Test the generalist + every specialist checkpoint in ``out`` on the config's test split.

    Args:
        config: the specialist config (its generalist, groups file, data and Trainer are used).
        out: directory of the ``group<G>.ckpt`` files.
        workdir: where relative paths resolve.
        overrides: ``kd`` arguments, as for training.
        groups_file: instead of the config's groups file.
        split: ``"test"``, or ``"val"`` to score the combination on the validation split (what choices
            between settings are made on).

    Returns:
        The :class:`~kd_lightning.specialists.SpecialistEnsemble` report, plus ``named_groups`` and the
        wall-clock ``seconds`` of the generalist alone and of the ensemble over the split.

    Raises:
        ValueError: the config names no generalist checkpoint, or an unknown ``split``.
        FileNotFoundError: a group's specialist is not trained yet.
    """
    from kd_lightning.cli import main
    from kd_lightning.datamodules import IndexedDataModule
    from kd_lightning.modules import load_teacher
    from kd_lightning.specialists import SpecialistEnsemble

    if split not in ("val", "test"):
        raise ValueError(f"`split` must be 'val' or 'test', got {split!r}.")
    config = Path(config).resolve()
    workdir = Path(workdir)
    out = (workdir / out).resolve()  # `out` if absolute
    generalist = specialist_config(config, overrides).model.init_args.generalist_ckpt
    if generalist is None:
        raise ValueError(f"`config` {config}: evaluation needs model.init_args.generalist_ckpt.")
    if groups_file is None:
        groups_path, groups = groups_of(config, overrides, workdir)
    else:
        groups_path, groups = Path(groups_file), ClassGroups.load(groups_file)
    checkpoints = [out / f"group{g}.ckpt" for g in range(len(groups.groups))]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"evaluation: specialists not trained yet: {missing}")
    with working_directory(workdir), own_argv():
        # The model is built only for the CLI's links and is not used: no generalist to load, and so no
        # soft targets and no initialisation from it (which would need one).
        args = [
            *overrides,
            f"{GENERALIST_ARG}=null",
            "--model.init_args.init_from=scratch",
            "--model.init_args.soft_weight=0.0",
        ]
        cli = main(["--config", str(config), *args], run=False)
        data = cli.datamodule
        # The test split as every model sees it: natural sampling, no specialist relabelling.
        plain = IndexedDataModule(
            data.source,
            eval_batch_size=data.eval_batch_size,
            val_size=data.val_size,
            split_seed=data.split_seed,
            eval_transform=data.eval_transform,
        )
        ensemble = SpecialistEnsemble(str(generalist), [str(p) for p in checkpoints], str(groups_path))
        # The config's own Trainer (devices, precision, limits), never used for fitting here.
        trainer = cli.trainer
        evaluate = trainer.test if split == "test" else trainer.validate
        start = time.perf_counter()
        evaluate(load_teacher(str(generalist)), plain, verbose=False)
        generalist_seconds = time.perf_counter() - start
        start = time.perf_counter()
        evaluate(ensemble, plain, verbose=False)
        ensemble_seconds = time.perf_counter() - start
    report = dict(ensemble.report)
    report["named_groups"] = [[groups.class_names[c] for c in g] for g in report["groups"]]
    report["seconds"] = {"generalist": round(generalist_seconds, 2), "ensemble": round(ensemble_seconds, 2)}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report of :func:`evaluate_specialists` as markdown tables: accuracies, conditional accuracies,
    the paper's Table 4 (by how many specialists cover the true class), cost."""
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


def default_out(config: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Where a specialist config's checkpoints go by default: its ``trainer.default_root_dir`` (overrides
    included), else ``runs/specialists``."""
    return Path(specialist_config(config, overrides).trainer.default_root_dir or "runs/specialists")


def train_specialists(
    config: str | Path,
    group: int | None = None,
    groups_file: str | Path | None = None,
    out: str | Path | None = None,
    workdir: str | Path = ".",
    evaluate: bool = False,
    force: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the specialists of a groups file (all, or one group) and optionally score their combination.

    Args:
        config: a specialist config (``kd`` YAML), e.g. configs/fashion_mnist/specialist.yaml.
        group: train only this group (one task of a SLURM array job); default: every group.
        groups_file: instead of the config's ``data.init_args.groups_file``.
        out: checkpoint directory (relative to ``workdir``); default: the config's ``trainer.default_root_dir``.
        workdir: where relative paths resolve.
        evaluate: after training, combine the generalist with every specialist in ``out`` on the test split;
            writes ``out/report.json`` and ``out/table4.png``.
        force: retrain groups that already finished.
        overrides: ``kd`` arguments for every run, e.g. ``["--trainer.max_epochs=1"]``.

    Returns:
        ``{"groups_file", "out", "specialists"}`` (one :class:`StageResult` per trained group) and, with
        ``evaluate``, ``"report"`` (see :func:`evaluate_specialists`) and ``"picture"`` (the Table 4 PNG).

    Raises:
        ValueError: ``group`` is not a group of the file, or the config names no groups file.
    """
    from kd_lightning.plots import plot_specialist_breakdown
    from kd_lightning.progress import Progress

    workdir = Path(workdir)
    overrides = _with_groups_file(overrides, groups_file)
    groups_path, groups = groups_of(config, overrides, workdir)
    if group is not None:
        groups.group(group)  # a clear error for a group the file does not have
    out = (workdir / (default_out(config, overrides) if out is None else out)).resolve()
    out.mkdir(parents=True, exist_ok=True)

    todo = [group] if group is not None else list(range(len(groups.groups)))
    results = []
    # One line per finished specialist with the time left (Lightning's bar covers one fit only).
    tracker = Progress(len(todo), desc="specialists", unit="specialist", bar=False, stream=sys.stdout)
    for g in todo:
        names = ", ".join(groups.class_names[c] for c in groups.groups[g])
        print(f"\n=== specialist {g}/{len(groups.groups)}: {names}", flush=True)
        r = train_specialist(config, g, out, workdir, overrides, force)
        results.append(r)
        took = "reused" if r.reused else f"{r.fit_seconds:.0f} s"
        tracker.update(
            note=f"group {g}: test acc over its {len(r.details['classes']) + 1} labels "
            f"{100 * r.metrics.get('test/acc', float('nan')):.2f}%, "
            f"dustbin correction {r.details['dustbin_correction']:+.3f}, {took}"
        )
    summary: dict[str, Any] = {"groups_file": str(groups_path), "out": str(out), "specialists": results}
    if evaluate:
        report = evaluate_specialists(config, out, workdir, overrides)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        picture = plot_specialist_breakdown(
            report, out / "table4.png", title=f"generalist + {len(groups.groups)} specialists, test split"
        )
        summary["report"], summary["picture"] = report, str(picture)
    return summary
