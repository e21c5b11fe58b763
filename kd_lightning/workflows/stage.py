"""Run a shipped config as one stage of a pipeline: ``kd fit`` then ``kd test``, in-process, with reuse.

A stage is exactly what ``kd fit --config C [overrides]`` followed by ``kd test`` would do; running
it in-process saves the interpreter start and torch import per stage. A finished stage leaves a
record (``result.json`` beside its checkpoint) and is not recomputed unless ``force`` is set; one that
was interrupted (killed, preempted) resumes from its run's last checkpoint.

The record is one flat JSON object: the fields of :class:`StageResult` (``details`` excepted) followed
by the stage's details (e.g. a specialist's group and classes), so that a reader sees one table of keys.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


@dataclass
class StageResult:
    """What one stage produced.

    Args:
        name: label of the stage in tables.
        command: the ``kd fit`` command the stage ran (its identity: a stage is reused only for the same one).
        checkpoint: absolute path of the stage's checkpoint.
        test_acc: ``test/acc`` of the fitted model.
        params: parameters of the model's network (``model.net``).
        fit_seconds: wall-clock seconds of the fit.
        metrics: every metric of the last validation epoch (``val/...``; what choices between stages are
            made on) and of the test (``test/...``).
        reused: whether the stage was read back instead of run.
        details: what the caller recorded besides (see ``run_stage``'s ``details``).
    """

    name: str
    command: str
    checkpoint: str
    test_acc: float
    params: int
    fit_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The flat JSON object written for the stage: the fields, then the details.

        Example:
            >>> StageResult("a", "kd fit", "a.ckpt", 0.5, 10, 1.0, details={"group": 2}).record()["group"]
            2
        """
        fixed = {k: v for k, v in asdict(self).items() if k != "details"}
        return {**fixed, **self.details}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StageResult | None:
        """Read :meth:`record`'s output back; ``None`` for a record of another format (it cannot be reused).

        Example:
            >>> r = StageResult("a", "kd fit", "a.ckpt", 0.5, 10, 1.0, details={"group": 2})
            >>> StageResult.from_record(r.record()) == r, StageResult.from_record({"command": "kd fit"})
            (True, None)
        """
        names = {f.name for f in fields(cls)} - {"details"}
        required = names - {"metrics", "reused"}
        if not required <= record.keys():
            return None
        return cls(
            **{k: v for k, v in record.items() if k in names},
            details={k: v for k, v in record.items() if k not in names},
        )


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run relative paths in shipped configs (``runs/...``) under ``path`` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextmanager
def own_argv() -> Iterator[None]:
    """Hide the calling program's arguments from LightningCLI, which warns when it is given ``args`` while
    ``sys.argv`` holds some too (a script's or ``kd <workflow>``'s own)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


# Arguments that change how a run looks, not what it computes: a finished stage is reused across them.
_PRESENTATION = ("--trainer.enable_progress_bar", "--trainer.enable_model_summary")


def same_result(saved: str, command: str) -> bool:
    """Whether two stage commands compute the same thing: equal once presentation-only arguments are dropped.

    Example:
        >>> same_result("kd fit --config a.yaml --trainer.enable_progress_bar=false", "kd fit --config a.yaml")
        True
        >>> same_result("kd fit --config a.yaml --seed_everything=2", "kd fit --config a.yaml")
        False
    """

    def key(text: str) -> list[str]:
        return [a for a in shlex.split(text) if not a.startswith(_PRESENTATION)]

    return key(saved) == key(command)


def _finished(
    record_file: Path, checkpoint: Path, command: str, expect: Mapping[str, Any] | None
) -> StageResult | None:
    """The stage's saved result if it ran ``command`` and recorded the ``expect``ed details, else ``None``."""
    if not (record_file.is_file() and checkpoint.is_file()):
        return None
    saved = StageResult.from_record(json.loads(record_file.read_text()))
    if saved is None or not same_result(saved.command, command):
        return None
    if any(saved.details.get(k) != v for k, v in (expect or {}).items()):
        return None
    saved.reused = True
    return saved


def run_stage(
    name: str,
    config: str | Path,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    force: bool = False,
    *,
    checkpoint: str | Path | None = None,
    run_args: Sequence[str] = (),
    details: Callable[[L.LightningModule], dict[str, Any]] | None = None,
    expect: Mapping[str, Any] | None = None,
    resume: bool = True,
) -> StageResult:
    """Fit and test the model of ``config`` (paths inside it relative to ``workdir``), or reuse a finished run.

    Args:
        name: label of the stage in tables.
        config: a ``kd`` YAML config.
        workdir: directory the config's relative paths (``runs/...``) resolve against.
        overrides: extra ``kd`` arguments, e.g. ``["--seed_everything=2"]``; part of the stage's command.
        force: refit from scratch even if a finished result (or an unfinished run's ``last.ckpt``) exists;
            without it, a stage that did not finish resumes from the newest ``last*.ckpt`` of its run.
        checkpoint: where the stage's checkpoint goes (relative to ``workdir``): the fitted model is saved
            there and the record beside it as ``<stem>.json``. Default: the file of the config's first
            ModelCheckpoint with a fixed ``filename``, and ``result.json`` beside it; when that checkpoint
            ``monitor``s a metric (``save_top_k: 1``: early stopping), its best epoch is the stage's model,
            validated and tested.
        run_args: ``kd`` arguments that only place the run (e.g. its ``--trainer.default_root_dir`` when
            ``checkpoint`` already names the stage), given to ``kd`` but left out of the command.
        details: what to record besides the metrics, computed from the fitted model (e.g. a specialist's
            classes); stored in the record and in :attr:`StageResult.details`.
        expect: a finished stage is reused only if its recorded details hold these values.
        resume: continue an unfinished run from its last checkpoint (the default); ``False`` fits afresh.

    Returns:
        The stage's result; ``reused`` says whether it was read back.

    Raises:
        ValueError: no ``checkpoint`` given and the config has no ModelCheckpoint callback with a fixed
            ``filename`` (its output could not be found again).
    """
    from kd_lightning.callbacks.run_identity import last_checkpoint
    from kd_lightning.cli import continue_wandb_run, main  # the CLI registers every class a config may name

    config = Path(config).resolve()
    workdir = Path(workdir)
    args = ["--config", str(config), *overrides]
    command = "kd fit " + " ".join(shlex.quote(a) for a in args)
    target = None if checkpoint is None else (workdir / checkpoint).resolve()
    if target is not None and not force:
        # Checked before the CLI builds anything (a teacher or generalist to load, a dataset to read).
        saved = _finished(target.with_suffix(".json"), target, command, expect)
        if saved is not None:
            return saved
    with working_directory(workdir), own_argv():
        cli = main([*args, *run_args], run=False)
        monitored = None  # the output checkpoint keeps the best epoch of a monitored metric (early stopping)
        if target is None:
            # The stage's output: the first ModelCheckpoint with a fixed name (`final`); the CLI gives it the
            # run's checkpoint directory. Others (the step-wise `last.ckpt`) are for resuming.
            checkpoint_cb = next(
                (
                    c
                    for c in cli.trainer.callbacks
                    if isinstance(c, ModelCheckpoint) and c.dirpath and c.filename and "{" not in c.filename
                ),
                None,
            )
            if checkpoint_cb is None:
                raise ValueError(
                    f"`config` {config}: a pipeline stage needs a ModelCheckpoint callback with a fixed "
                    "`filename` (or give `checkpoint`)."
                )
            target = (Path(checkpoint_cb.dirpath) / f"{checkpoint_cb.filename}.ckpt").resolve()
            monitored = checkpoint_cb.monitor
            record_file = target.parent / "result.json"
            if not force:
                saved = _finished(record_file, target, command, expect)
                if saved is not None:
                    return saved
        else:
            record_file = target.with_suffix(".json")
            target.parent.mkdir(parents=True, exist_ok=True)
        # An unfinished stage (killed, preempted, requeued) continues from its last checkpoint and W&B run.
        last = None if force or not resume else last_checkpoint(cli.trainer)
        if last is not None:
            continue_wandb_run(cli.trainer, last)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=last)
        fit_seconds = time.perf_counter() - start
        best = None
        if monitored is not None:  # the fitted model is the checkpoint's best epoch: validated and tested
            best = str(target)
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
        elif not any(k.startswith("val/") for k in cli.trainer.callback_metrics):
            # Resumed from a run that had already reached its budget: fit ran no epoch to validate.
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        # The fitted model's validation metrics (last epoch, or the best one): what stages are compared on.
        validation = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        if checkpoint is not None:
            cli.trainer.save_checkpoint(target)  # collective; rank 0 writes
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)[0]
        result = StageResult(
            name=name,
            command=command,
            checkpoint=str(target),
            test_acc=float(metrics["test/acc"]),
            params=sum(p.numel() for p in cli.model.net.parameters()),
            fit_seconds=round(fit_seconds, 1),
            metrics={**validation, **{k: float(v) for k, v in metrics.items()}},
            details={} if details is None else details(cli.model),
        )
        if cli.trainer.is_global_zero:
            record_file.write_text(json.dumps(result.record(), indent=2))
    return result


def format_table(rows: Sequence[StageResult]) -> str:
    """A markdown table of stage results.

    Example:
        >>> print(format_table([StageResult("teacher", "kd fit", "t.ckpt", 0.9, 1000, 12.0)]))
        | model | test acc (%) | params | fit time (s) | reused |
        |---|---:|---:|---:|---|
        | teacher | 90.00 | 1,000 | 12 | no |
    """
    lines = ["| model | test acc (%) | params | fit time (s) | reused |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {100 * r.test_acc:.2f} | {r.params:,} | {r.fit_seconds:.0f} | {'yes' if r.reused else 'no'} |"
        )
    return "\n".join(lines)


def validation_curve(result: StageResult, metric: str = "val/acc") -> list[float]:
    """``metric`` after every validation epoch of a stage's run, from the CSVLogger's ``metrics.csv``.

    The run is the one that wrote the stage's checkpoint (``<run dir>/checkpoints/...``); its config logs
    with ``lightning.pytorch.loggers.CSVLogger`` (``save_dir: .``, as the ``configs/mnist1d`` ones do); the
    versions a resumed run wrote are read in order.

    Raises:
        FileNotFoundError: the run has no ``metrics.csv`` (its config has no CSVLogger).
        ValueError: ``metric`` is not a column of it (the message lists the columns).
    """
    run_dir = Path(result.checkpoint).parent.parent
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(
            f"stage {result.name!r}: no csv/version_*/metrics.csv in {str(run_dir)!r}; add a CSVLogger "
            "(`save_dir: .`) to the config's `trainer.logger`."
        )
    by_epoch: dict[int, float] = {}
    for file in sorted(files, key=lambda f: int(f.parent.name.removeprefix("version_"))):
        with file.open(newline="") as f:
            rows = list(csv.DictReader(f))
        columns = rows[0].keys() if rows else []
        if metric not in columns:
            raise ValueError(f"`metric` {metric!r} is not in {str(file)!r}; its columns: {sorted(columns)}.")
        # A resumed run starts a new version; its epochs replace those logged before the interruption.
        by_epoch.update({int(r["epoch"]): float(r[metric]) for r in rows if r[metric] not in ("", None)})
    return [by_epoch[e] for e in sorted(by_epoch)]
