"""Choose between candidate settings of one config on the validation split, and record the choice.

Each candidate is one stage (:func:`~kd_lightning.workflows.stage.run_stage`, reused when finished) in a
directory of its own; the choice reads the monitored *validation* metric of each fitted model (the
last validation epoch, which is the saved model's) and nothing else. Test metrics are recorded beside
it, for the report, but never compared. The record (``selection.json``) names every candidate, its
arguments and its validation score, so a report can say what was chosen and how.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from kd_lightning.workflows.stage import StageResult, run_stage

_NAME = re.compile(r"^[A-Za-z0-9_.+=-]+$")


@dataclass
class Selection:
    """The outcome of :func:`choose_on_validation`.

    Args:
        name: what was chosen (e.g. ``"mlp teacher"``).
        monitor: the validation metric compared (e.g. ``"val/acc"``).
        mode: ``"max"`` or ``"min"``: which end of ``monitor`` is best.
        chosen: the winning candidate's name.
        scores: candidate -> its ``monitor`` value.
        arguments: candidate -> its ``kd`` arguments.
        results: candidate -> its stage result (checkpoint, test metrics for the report, fit time).
    """

    name: str
    monitor: str
    mode: str
    chosen: str
    scores: dict[str, float]
    arguments: dict[str, list[str]]
    results: dict[str, StageResult] = field(default_factory=dict)

    @property
    def result(self) -> StageResult:
        """The chosen candidate's stage."""
        return self.results[self.chosen]


def best_candidate(scores: Mapping[str, float], mode: Literal["max", "min"] = "max") -> str:
    """The candidate with the best score; ties go to the first listed (the simpler setting, by convention).

    Raises:
        ValueError: no scores, a score that is not finite, or an unknown ``mode``.

    Example:
        >>> best_candidate({"a": 0.90, "b": 0.92, "c": 0.92})
        'b'
        >>> best_candidate({"a": 0.3, "b": 0.2}, mode="min")
        'b'
    """
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
    if not scores:
        raise ValueError("`scores` is empty: there is nothing to choose from.")
    bad = {k: v for k, v in scores.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"`scores`: not finite for {bad}; a diverged candidate cannot be compared.")
    sign = 1.0 if mode == "max" else -1.0
    best = max(sign * v for v in scores.values())
    return next(k for k, v in scores.items() if sign * v == best)


def choose_on_validation(
    name: str,
    config: str | Path,
    candidates: dict[str, list[str]],
    out: str | Path,
    workdir: str | Path = ".",
    overrides: Sequence[str] = (),
    monitor: str = "val/acc",
    mode: Literal["max", "min"] = "max",
    force: bool = False,
) -> Selection:
    """Fit every candidate setting of ``config`` and choose the best on the validation split.

    Candidate ``c`` is the stage ``kd fit --config CONFIG [overrides] [candidates[c]]`` with its run under
    ``out/<c>``; a finished candidate is reused. The choice compares ``monitor`` (a validation metric of
    the fitted model) only; ``out/selection.json`` records every candidate's arguments and score and the
    choice.

    Args:
        name: what is being chosen, for tables and the record.
        config: the ``kd`` config every candidate starts from.
        candidates: candidate name -> its ``kd`` arguments (e.g. ``["--model.init_args.net.init_args.dropout=0.5"]``).
            Names are used as directory names (letters, digits, ``_.+=-``).
        out: directory of the candidates' runs and of ``selection.json`` (relative to ``workdir``).
        workdir: where the config's relative paths resolve.
        overrides: ``kd`` arguments for every candidate, before its own.
        monitor: the validation metric compared; it must start with ``val/``.
        mode: ``max`` or ``min``.
        force: refit finished candidates.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: no candidates, a name unusable as a directory, a ``monitor`` that is not a validation
            metric, or a candidate whose stage did not log it.
    """
    if not candidates:
        raise ValueError("`candidates` is empty: give at least one setting.")
    bad = [c for c in candidates if not _NAME.match(c)]
    if bad:
        raise ValueError(
            f"`candidates`: names must be letters, digits or '_.+=-' (directory names), got {bad}."
        )
    if not monitor.startswith("val/"):
        raise ValueError(
            f"`monitor` must be a validation metric ('val/...'), got {monitor!r}: choices never read test metrics."
        )
    out_dir = Path(workdir) / out
    results: dict[str, StageResult] = {}
    for candidate, args in candidates.items():
        root = [f"--trainer.default_root_dir={(out_dir / candidate).resolve()}"]
        results[candidate] = run_stage(
            f"{name} [{candidate}]", config, workdir, [*overrides, *args, *root], force
        )
    missing = [c for c, r in results.items() if monitor not in r.metrics]
    if missing:
        logged = sorted(k for k in next(iter(results.values())).metrics if k.startswith("val/"))
        raise ValueError(
            f"`monitor` {monitor!r} was not logged by {missing}; their validation metrics: {logged}."
        )
    scores = {c: r.metrics[monitor] for c, r in results.items()}
    selection = Selection(
        name=name,
        monitor=monitor,
        mode=mode,
        chosen=best_candidate(scores, mode),
        scores=scores,
        arguments={c: list(a) for c, a in candidates.items()},
        results=results,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    record = asdict(selection)
    record["results"] = {c: r.record() for c, r in results.items()}
    (out_dir / "selection.json").write_text(json.dumps(record, indent=2))
    return selection


def format_selection(selection: Selection) -> str:
    """A markdown table of the candidates: validation score (what decided) and, apart, test accuracy.

    Example:
        >>> r = StageResult("t", "kd fit", "t.ckpt", 0.9, 10, 1.0, {"val/acc": 0.91})
        >>> s = Selection("teacher", "val/acc", "max", "a", {"a": 0.91}, {"a": []}, {"a": r})
        >>> print(format_selection(s))
        | teacher: candidate | val/acc | chosen | test acc (%), reported only |
        |---|---:|---|---:|
        | a | 0.9100 | yes | 90.00 |
    """
    lines = [
        f"| {selection.name}: candidate | {selection.monitor} | chosen | test acc (%), reported only |",
        "|---|---:|---|---:|",
    ]
    for c, score in selection.scores.items():
        test = selection.results[c].test_acc if c in selection.results else float("nan")
        lines.append(f"| {c} | {score:.4f} | {'yes' if c == selection.chosen else ''} | {100 * test:.2f} |")
    return "\n".join(lines)
