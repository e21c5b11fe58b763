"""Run shipped configs as stages of a pipeline: ``kd fit`` then ``kd test``, in-process, with reuse.

A stage is exactly what ``kd fit --config C [overrides]`` followed by ``kd test`` would do; running
it in-process saves the interpreter start and torch import per stage. A finished stage leaves a
``result.json`` beside its checkpoint and is not recomputed unless ``force`` is set.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


@dataclass
class StageResult:
    """What one stage produced."""

    name: str
    command: str
    checkpoint: str
    test_acc: float
    params: int
    fit_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False


@contextmanager
def working_directory(path: Path):
    """Run relative paths in shipped configs (``runs/...``) under ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_stage(
    name: str,
    config: str | Path,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    force: bool = False,
) -> StageResult:
    """Fit and test the model of ``config`` (paths inside it relative to ``workdir``), or reuse a finished run.

    Args:
        name: label of the stage in tables.
        config: a ``kd`` YAML config.
        workdir: directory the config's relative paths (``runs/...``) resolve against.
        overrides: extra ``kd`` arguments, e.g. ``["--seed_everything=2"]``.
        force: refit even if a finished result exists.

    Raises:
        ValueError: the config has no ModelCheckpoint callback (its output could not be found again).
    """
    from kd_lightning.cli import main  # the CLI registers every class a config may name

    config = Path(config).resolve()
    args = ["--config", str(config), *overrides]
    command = "kd fit " + " ".join(shlex.quote(a) for a in args)
    with working_directory(Path(workdir)):
        cli = main(args, run=False)
        checkpoint_cb = next((c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint_cb is None or checkpoint_cb.dirpath is None:
            raise ValueError(
                f"`config` {config}: a pipeline stage needs a ModelCheckpoint callback with a `dirpath`."
            )
        checkpoint = Path(checkpoint_cb.dirpath) / f"{checkpoint_cb.filename or 'last'}.ckpt"
        result_file = checkpoint.parent / "result.json"
        if result_file.is_file() and checkpoint.is_file() and not force:
            saved = json.loads(result_file.read_text())
            if saved.get("command") == command:
                return StageResult(**{**saved, "reused": True})
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        result = StageResult(
            name=name,
            command=command,
            checkpoint=str(checkpoint.resolve()),
            test_acc=float(metrics["test/acc"]),
            params=sum(p.numel() for p in cli.model.net.parameters()),
            fit_seconds=round(fit_seconds, 1),
            metrics={k: float(v) for k, v in metrics.items()},
        )
        if cli.trainer.is_global_zero:
            result_file.write_text(json.dumps(asdict(result), indent=2))
    return result


def format_table(rows: Sequence[StageResult]) -> str:
    """A markdown table of stage results."""
    lines = ["| model | test acc (%) | params | fit time (s) | reused |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {100 * r.test_acc:.2f} | {r.params:,} | {r.fit_seconds:.0f} | {'yes' if r.reused else 'no'} |"
        )
    return "\n".join(lines)
