"""Intermediate-layer distillation on Fashion-MNIST: one CNN teacher, then, per seed, a smaller CNN student
alone, with Hinton KD, with FitNets hints and with attention transfer, all with the same network, recipe,
data and budget (configs/fashion_mnist/features_*.yaml); only the loss differs.

1. The teacher (``features_teacher.yaml``) is trained once, on the students' 25% of the training split.
2. The students alone (``features_student.yaml``), one per seed.
3. For each method (:data:`METHODS`), its weight is chosen among :data:`CANDIDATES` on the *validation*
   split with the first seed (:func:`~kd_lightning.workflows.selection.choose_on_validation`; the chosen
   candidate's run is that seed's run), then the other seeds run with the choice.
4. Each method's gain over the student alone is paired by seed (same initialisation and batch order) and
   given a verdict (:func:`paired_verdict`).

The teacher runs live in every distilled run (intermediate features are not in a soft-target store);
:func:`feature_bytes` says what storing them would cost per sample.

Layout under ``out``: ``teacher/seed0``, ``alone/seed<s>``, ``<method>/selection/<candidate>/seed<first>``,
``<method>/seed<s>``; finished stages are reused.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from kd_lightning.features import FeatureTaps, feature_shapes
from kd_lightning.workflows import CONFIGS
from kd_lightning.workflows.members import seed_overrides
from kd_lightning.workflows.selection import choose_on_validation
from kd_lightning.workflows.stage import StageResult, run_stage

FASHION = CONFIGS / "fashion_mnist"
METHODS: dict[str, str] = {
    "Hinton KD": "features_kd.yaml",
    "FitNets hints": "features_hints.yaml",
    "attention transfer": "features_at.yaml",
}
"""Method -> its student config."""

_OBJECTIVE = "--model.init_args.objective.init_args"
CANDIDATES: dict[str, dict[str, list[str]]] = {
    "Hinton KD": {
        "T2": [f"{_OBJECTIVE}.temperature=2.0"],
        "T4": [f"{_OBJECTIVE}.temperature=4.0"],
    },
    "FitNets hints": {
        "w1": [f"{_OBJECTIVE}.hint_weight=1.0"],
        "w10": [f"{_OBJECTIVE}.hint_weight=10.0"],
    },
    "attention transfer": {
        "b100": [f"{_OBJECTIVE}.beta=100.0"],
        "b1000": [f"{_OBJECTIVE}.beta=1000.0"],
    },
}
"""Method -> candidate name -> its ``kd`` arguments; two per method, so that each method gets the same tuning."""

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--data.init_args.eval_batch_size=128",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
"""``kd`` arguments of the quick mode: every stage at a few batches (checks the wiring, measures nothing)."""


def paired_verdict(baseline: Sequence[float], method: Sequence[float]) -> str:
    """``"gain"`` or ``"loss"`` when the mean paired difference exceeds twice its standard error, else
    ``"absent (within noise)"``; one seed has no spread and gets no verdict.

    Example:
        >>> paired_verdict([0.90, 0.91, 0.92], [0.92, 0.93, 0.94])
        'gain'
        >>> paired_verdict([0.90, 0.91, 0.92], [0.91, 0.90, 0.93])
        'absent (within noise)'
        >>> paired_verdict([0.9], [0.95])
        'no verdict (one seed)'
    """
    gains = [m - b for b, m in zip(baseline, method, strict=True)]
    if len(gains) < 2:
        return "no verdict (one seed)"
    mean = statistics.fmean(gains)
    error = statistics.stdev(gains) / math.sqrt(len(gains))
    if abs(mean) > 2 * error:
        return "gain" if mean > 0 else "loss"
    return "absent (within noise)"


@dataclass
class MethodResult:
    """One distillation method over the seeds (accuracies in [0, 1]).

    Args:
        name: the method.
        config: its student config.
        chosen: the candidate chosen on validation (``"config"`` without a choice).
        arguments: the chosen candidate's ``kd`` arguments.
        scores: candidate -> validation accuracy (first seed).
        test_acc: test accuracy per seed.
        gains: test accuracy minus the student alone's, per seed.
        verdict: :func:`paired_verdict` of the gains.
        fit_seconds: fit time per seed.
    """

    name: str
    config: str
    chosen: str
    arguments: list[str]
    scores: dict[str, float]
    test_acc: list[float]
    gains: list[float]
    verdict: str
    fit_seconds: list[float]


@dataclass
class FeatureStudy:
    """The outcome of :func:`compare_feature_methods`.

    Args:
        seeds: the student seeds.
        teacher: the teacher's stage record.
        alone: the student alone's test accuracy per seed.
        alone_seconds: its fit time per seed.
        student_params: parameters of the student network.
        methods: one :class:`MethodResult` per method.
        feature_bytes: per method, what its teacher features would cost to store (:func:`feature_bytes`).
        seconds: wall time of the study (reused stages cost nothing).
    """

    seeds: list[int]
    teacher: dict
    alone: list[float]
    alone_seconds: list[float]
    student_params: int
    methods: list[MethodResult]
    feature_bytes: dict[str, dict[str, int]]
    seconds: float


def feature_bytes(teacher_checkpoint: str | Path, config: str | Path) -> dict[str, int]:
    """Bytes per sample (and view) that a store would need for the teacher features ``config``'s objective
    compares, in fp16, beside the teacher's logits in fp16: ``{"features", "attention_maps", "logits"}``
    (``attention_maps``: one value per position of each layer, all attention transfer needs).

    Raises:
        ValueError: the config's objective names no teacher layers.
    """
    from kd_lightning.modules import load_teacher, network_of

    objective = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["objective"]["init_args"]
    names = objective.get("teacher_layers") or []
    if not names:
        raise ValueError(f"`config` {str(config)!r}: its objective names no `teacher_layers`.")
    teacher = load_teacher(teacher_checkpoint)
    network = network_of(teacher)
    shapes = feature_shapes(network, FeatureTaps.of(network, names, "teacher_layers"), teacher.input_shape)
    return {
        "features": sum(2 * math.prod(s) for s in shapes),
        "attention_maps": sum(2 * math.prod(s[1:]) for s in shapes),
        "logits": 2 * teacher.num_classes,
    }


def compare_feature_methods(
    seeds: Sequence[int] = (1, 2, 3),
    out: str | Path = "runs/benchmark_features",
    workdir: str | Path = ".",
    choose: bool = True,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> FeatureStudy:
    """Teacher once, then per seed the student alone, with Hinton KD, FitNets hints and attention transfer.

    Args:
        seeds: one student of each kind per seed; the first one runs the candidates.
        out: directory of every run (relative to ``workdir``).
        workdir: where the configs' relative paths resolve.
        choose: choose each method's weight on validation among :data:`CANDIDATES`; ``False`` keeps the
            configs' own settings.
        overrides: ``kd`` arguments for every run (e.g. :data:`QUICK`).
        force: recompute finished stages.

    Returns:
        The :class:`FeatureStudy`.

    Raises:
        ValueError: no seed.
    """
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one seed.")
    start = time.perf_counter()
    out = Path(out)
    seeds = list(seeds)
    teacher = run_stage(
        "teacher",
        FASHION / "features_teacher.yaml",
        workdir,
        [*overrides, *seed_overrides(0, out / "teacher")],
        force,
    )
    alone = [
        run_stage(
            f"alone s{seed}",
            FASHION / "features_student.yaml",
            workdir,
            [*overrides, *seed_overrides(seed, out / "alone")],
            force,
        )
        for seed in seeds
    ]
    live = [*overrides, f"--model.init_args.teacher_ckpt={teacher.checkpoint}"]
    methods, sizes = [], {}
    for method, file in METHODS.items():
        config = FASHION / file
        first: StageResult | None = None
        chosen, arguments, scores = "config", [], {}
        if choose:
            selection = choose_on_validation(
                method,
                config,
                CANDIDATES[method],
                out / _slug(method) / "selection",
                workdir,
                overrides=[*live, f"--seed_everything={seeds[0]}"],
                force=force,
            )
            chosen, arguments, scores = (
                selection.chosen,
                selection.arguments[selection.chosen],
                selection.scores,
            )
            first = selection.result
        runs = [
            first
            if i == 0 and first is not None
            else run_stage(
                f"{method} s{seed}",
                config,
                workdir,
                [*live, *arguments, *seed_overrides(seed, out / _slug(method))],
                force,
            )
            for i, seed in enumerate(seeds)
        ]
        acc = [r.test_acc for r in runs]
        base = [r.test_acc for r in alone]
        methods.append(
            MethodResult(
                name=method,
                config=str(config),
                chosen=chosen,
                arguments=arguments,
                scores=scores,
                test_acc=acc,
                gains=[m - b for b, m in zip(base, acc, strict=True)],
                verdict=paired_verdict(base, acc),
                fit_seconds=[r.fit_seconds for r in runs],
            )
        )
        if method != "Hinton KD":
            sizes[method] = feature_bytes(teacher.checkpoint, config)
    return FeatureStudy(
        seeds=seeds,
        teacher=teacher.record(),
        alone=[r.test_acc for r in alone],
        alone_seconds=[r.fit_seconds for r in alone],
        student_params=alone[0].params,
        methods=methods,
        feature_bytes=sizes,
        seconds=round(time.perf_counter() - start, 1),
    )


def _slug(method: str) -> str:
    """A method's directory name.

    Example:
        >>> _slug("FitNets hints")
        'fitnets_hints'
    """
    return method.lower().replace(" ", "_")
