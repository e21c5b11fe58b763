"""Run shipped configs as stages of a pipeline: ``kd fit`` then ``kd test``, in-process, with reuse.

A stage is exactly what ``kd fit --config C [overrides]`` followed by ``kd test`` would do; running
it in-process saves the interpreter start and torch import per stage. A finished stage leaves a
``result.json`` beside its checkpoint and is not recomputed unless ``force`` is set; one that was
interrupted (killed, preempted) resumes from its run's last checkpoint.
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
        force: refit from scratch even if a finished result (or an unfinished run's ``last.ckpt``) exists;
            without it, a stage that did not finish resumes from the newest ``last*.ckpt`` of its run.

    Raises:
        ValueError: the config has no ModelCheckpoint callback with a fixed ``filename`` (its output could
            not be found again).
    """
    from kd_lightning.callbacks.run_identity import last_checkpoint
    from kd_lightning.cli import continue_wandb_run, main  # the CLI registers every class a config may name

    config = Path(config).resolve()
    args = ["--config", str(config), *overrides]
    command = "kd fit " + " ".join(shlex.quote(a) for a in args)
    with working_directory(Path(workdir)):
        cli = main(args, run=False)
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
                f"`config` {config}: a pipeline stage needs a ModelCheckpoint callback with a fixed `filename`."
            )
        checkpoint = Path(checkpoint_cb.dirpath) / f"{checkpoint_cb.filename}.ckpt"
        result_file = checkpoint.parent / "result.json"
        if result_file.is_file() and checkpoint.is_file() and not force:
            saved = json.loads(result_file.read_text())
            if same_result(saved.get("command", ""), command):
                return StageResult(**{**saved, "reused": True})
        # An unfinished stage (killed, preempted, requeued) continues from its last checkpoint and W&B run.
        resume = None if force else last_checkpoint(cli.trainer)
        if resume is not None:
            continue_wandb_run(cli.trainer, resume)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
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


def member_dir(out: str | Path, member: int) -> Path:
    """Directory of ensemble member ``member`` under ``out``: ``out/member_<k>``."""
    return Path(out) / f"member_{member}"


def member_overrides(
    member: int, out: str | Path, seed_base: int = 0, vary: tuple[str, Sequence[str]] | None = None
) -> list[str]:
    """The ``kd`` arguments that make run ``member`` of a config an ensemble member of its own.

    Member ``k`` gets seed ``seed_base + k`` and its own root ``out/member_<k>``: the ``kd`` command puts
    its run (checkpoints, logs) in ``out/member_<k>/seed<seed>``. With ``vary=(key, values)`` also
    ``--<key>=values[k]`` (e.g. a width per member).

    Raises:
        ValueError: ``member`` is negative, or ``vary`` has no value for it.
    """
    if member < 0:
        raise ValueError(f"`member` must be >= 0, got {member}.")
    d = member_dir(out, member)
    args = [f"--seed_everything={seed_base + member}", f"--trainer.default_root_dir={d}"]
    if vary is not None:
        key, values = vary
        if member >= len(values):
            raise ValueError(f"`vary` {key!r} has {len(values)} values, none for member {member}.")
        args.append(f"--{key.removeprefix('--')}={values[member]}")
    return args


def seed_overrides(seed: int, out: str | Path) -> list[str]:
    """The ``kd`` arguments of one seed of a repeated run: the seed, and the root ``out``, so that the ``kd``
    command puts the run (checkpoint and logs) in ``out/seed<seed>`` and every seed's finished stage is kept
    and reused."""
    return [f"--seed_everything={seed}", f"--trainer.default_root_dir={out}"]


def train_members(
    config: str | Path,
    members: Sequence[int],
    out: str | Path,
    workdir: str | Path = ".",
    seed_base: int = 0,
    vary: tuple[str, Sequence[str]] | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    name: str = "member",
) -> list[StageResult]:
    """Train ensemble members of one config one after another (finished members are reused).

    Args:
        config: a ``kd`` config of one classifier.
        members: which members to train (``range(N)`` for N members; one id for one array task).
        out: directory of the members (relative paths resolve against ``workdir``).
        workdir: where the config's relative paths resolve.
        seed_base: member ``k`` is seeded ``seed_base + k``.
        vary: ``(key, values)``: member ``k`` also gets ``--key=values[k]``.
        overrides: ``kd`` arguments for every member (before the member's own).
        force: retrain finished members.
        name: label of the members in tables.
    """
    from kd_lightning.progress import progress

    results: list[StageResult] = []
    for k in progress(list(members), desc="ensemble members", unit="member"):
        args = [*overrides, *member_overrides(k, out, seed_base, vary)]
        results.append(run_stage(f"{name} {k}", config, workdir, args, force))
    return results
