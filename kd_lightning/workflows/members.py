"""Ensemble members and repeated seeds of one config: the ``kd`` arguments that place each run, and the
workflow that trains the members one after another (each a :func:`~kd_lightning.workflows.stage.run_stage`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kd_lightning.workflows.stage import StageResult, run_stage


def member_dir(out: str | Path, member: int) -> Path:
    """Directory of ensemble member ``member`` under ``out``: ``out/member_<k>``.

    Example:
        >>> member_dir("runs/members", 2).as_posix()
        'runs/members/member_2'
    """
    return Path(out) / f"member_{member}"


def member_overrides(
    member: int, out: str | Path, seed_base: int = 0, vary: tuple[str, Sequence[str]] | None = None
) -> list[str]:
    """The ``kd`` arguments that make run ``member`` of a config an ensemble member of its own.

    Member ``k`` gets seed ``seed_base + k`` and its own root ``out/member_<k>``: the ``kd`` command puts
    its run (checkpoints, logs) in ``out/member_<k>/seed<seed>``. With ``vary=(key, values)`` also
    ``--<key>=values[k]`` (e.g. a width per member).

    Args:
        member: the member's id ``k``.
        out: directory of the members.
        seed_base: member ``k`` is seeded ``seed_base + k``.
        vary: ``(key, values)``: member ``k`` also gets ``--key=values[k]``.

    Returns:
        The member's ``kd`` arguments.

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
    and reused.

    Example:
        >>> seed_overrides(3, "runs/x")
        ['--seed_everything=3', '--trainer.default_root_dir=runs/x']
    """
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

    Member ``k`` is ``kd fit --config CONFIG [overrides] --seed_everything=SEED_BASE+k
    --trainer.default_root_dir=OUT/member_<k>`` followed by ``kd test``.

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

    Returns:
        One result per member, in the order of ``members``.
    """
    from kd_lightning.progress import progress

    results: list[StageResult] = []
    for k in progress(list(members), desc="ensemble members", unit="member"):
        args = [*overrides, *member_overrides(k, out, seed_base, vary)]
        results.append(run_stage(f"{name} {k}", config, workdir, args, force))
    return results
