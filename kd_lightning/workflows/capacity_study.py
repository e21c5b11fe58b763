"""Generalist + specialists where the paper's condition holds: a capacity-limited generalist on many
confusable classes, with overlapping specialist groups (Hinton, Vinyals & Dean 2015, section 5).

The shipped configs ``configs/synthetic/generalist.yaml`` and ``specialist.yaml`` define the task (100
Gaussian classes in 10 planted superclasses that overlap at their borders) and the networks (an MLP with
16 hidden units for the generalist and every specialist). Per seed, everything runs through the product's
stages, in ``<workdir>/seed<seed>`` (the configs' relative paths resolve there, so seeds never share a
groups file):

1. the generalist (:func:`~kd_lightning.workflows.stage.run_stage`); its ``ConfusionClustering`` callback
   writes the overlapping groups at its last validation epoch;
2. a wider reference (64 hidden units, same recipe) in ``seed<seed>/wide``: the evidence that 16 units
   limit the generalist;
3. one specialist per group (:func:`~kd_lightning.workflows.specialists.train_specialist`) and their KL
   combination on the test split (:func:`~kd_lightning.workflows.specialists.evaluate_specialists`).

:func:`choose_settings` picks the overlap, the specialists' epochs and the soft-target weight on the
*validation* split (one seed, one setting changed at a time) and records every score; :func:`capacity_study`
runs the seeds with a setting and returns the report; :func:`format_capacity_report` prints it beside the
paper's Table 4.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lightning.summary import mean_std
from kd_lightning.workflows import CONFIGS
from kd_lightning.workflows.specialists import (
    GENERALIST_ARG,
    GROUPS_ARG,
    evaluate_specialists,
    train_specialist,
)
from kd_lightning.workflows.stage import StageResult, run_stage

GENERALIST_CONFIG = CONFIGS / "synthetic" / "generalist.yaml"
"""The capacity-limited generalist (MLP, 16 hidden units) and its overlapping groups."""
SPECIALIST_CONFIG = CONFIGS / "synthetic" / "specialist.yaml"
"""One specialist of the generalist's groups file."""
GROUPS_FILE = Path("runs/synthetic/generalist/groups.json")
"""Where the generalist config's clustering callback writes the groups (relative to a seed's directory)."""
WIDE_HIDDEN = 64
"""Hidden units of the reference generalist that shows the shipped one (16) is capacity-limited."""
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
"""``kd`` arguments that keep Lightning's bars and summaries out of the report."""

PAPER_TABLE4: dict[str, float] = {
    "0": 0.0,
    "1": 3.4,
    "2": 7.4,
    "3": 8.8,
    "4": 10.5,
    "5": 11.1,
    "10+": 14.1,
}
"""The paper's Table 4 (JFT): relative test-accuracy improvement (%) of generalist + specialists over the
generalist alone, by the number of specialists covering the true class (rows 6 to 9 lie between)."""

SEARCH_START: dict[str, Any] = {"overlap": 3, "overlap_threshold": 0.05, "epochs": 10, "soft_weight": 0.0}
"""Where :func:`choose_settings` starts (the settings not yet chosen, in each round)."""
DEFAULT_SETTING: dict[str, Any] = {"overlap": 3, "overlap_threshold": 0.1, "epochs": 40, "soft_weight": 0.0}
"""The shipped configs' setting, chosen by :func:`choose_settings` on seed 1's validation split
(docs/specialists.md has the scores)."""
DEMO_SEEDS = (1, 2)
"""Seeds of the small-budget demonstration (:func:`capacity_demo`)."""
DEMO_EPOCHS = 5
"""Specialist epochs of the small-budget demonstration."""


def _seed_dir(workdir: Path, seed: int) -> Path:
    return Path(workdir) / f"seed{seed}"


def hidden_text(hidden: int | Sequence[int]) -> str:
    """The ``kd`` value of an MLP's ``hidden`` layers: one width or several.

    Example:
        >>> hidden_text(64), hidden_text((16, 16))
        ('[64]', '[16,16]')
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    return "[" + ",".join(str(int(w)) for w in widths) + "]"


def train_generalist(
    seed: int,
    workdir: str | Path,
    overrides: Sequence[str] = (),
    hidden: int | Sequence[int] | None = None,
    subdir: str = "wide",
) -> StageResult:
    """Fit and test the generalist of ``configs/synthetic/generalist.yaml`` for one seed (reused when done).

    Args:
        seed: ``--seed_everything``.
        workdir: the study's directory; the run goes to ``seed<seed>/`` (``seed<seed>/<subdir>/`` with ``hidden``).
        overrides: ``kd`` arguments of the run (e.g. a smaller budget).
        hidden: other hidden layers (one width, e.g. the capacity reference's 64, or several: a deeper
            MLP), trained with the same recipe and budget; its clustering writes under ``<subdir>/``.
        subdir: the directory of a run with ``hidden``, under ``seed<seed>/``.

    Returns:
        The stage's result; the groups file is ``seed<seed>/runs/synthetic/generalist/groups.json``.
    """
    where = _seed_dir(Path(workdir), seed)
    args = [f"--seed_everything={seed}", *QUIET, *overrides]
    if hidden is not None:
        where = where / subdir
        args.append(f"--model.init_args.net.init_args.hidden={hidden_text(hidden)}")
    name = "generalist" if hidden is None else f"generalist, hidden layers {hidden_text(hidden)}"
    return run_stage(name, GENERALIST_CONFIG, where, args)


def overlap_groups(groups_file: Path, overlap: int, overlap_threshold: float | None, out: Path) -> Path:
    """Re-cluster a groups file's matrix with another overlap, as the clustering callback would, into ``out``.

    The matrix, the number of groups, the grouping and the size bounds are the file's; only the overlap
    changes, so candidates of :func:`choose_settings` differ in that alone.

    Args:
        groups_file: a groups file written by ``ConfusionClustering`` (with its matrix).
        overlap: groups per class (at most, with a threshold).
        overlap_threshold: see :func:`~kd_lightning.clustering.cluster_classes`.
        out: the new groups file.

    Returns:
        ``out``.

    Raises:
        ValueError: the file holds no matrix.
    """
    import torch

    from kd_lightning.clustering import (
        ClassGroups,
        KMeansGrouping,
        SpectralGrouping,
        cluster_classes,
        drop_duplicate_groups,
        drop_small_groups,
    )

    base = ClassGroups.load(groups_file)
    if base.matrix is None:
        raise ValueError(f"`groups_file` {groups_file}: no matrix to re-cluster.")
    method = dict(base.method)
    kinds = {"SpectralGrouping": SpectralGrouping, "KMeansGrouping": KMeansGrouping}
    options = {k: method[k] for k in ("n_init", "seed", "closure", "normalize") if k in method}
    grouping = kinds[method["grouping"]](**options)
    partition = cluster_classes(
        torch.tensor(base.matrix),
        method["num_groups"],
        grouping,
        min_size=method["min_size"],
        max_size=method["max_size"],
        overlap=overlap,
        overlap_threshold=overlap_threshold,
    )
    kept = drop_duplicate_groups(drop_small_groups(partition, method["min_specialist_size"]))
    method.update(overlap=overlap, overlap_threshold=overlap_threshold)
    source = {**base.source, "partition": partition, "recluster_of": str(groups_file)}
    ClassGroups(base.num_classes, base.class_names, kept, method, source, base.matrix).save(out)
    return out


def specialists_run(
    seed: int,
    workdir: str | Path,
    setting: dict[str, Any],
    split: str = "test",
    overrides: Sequence[str] = (),
    name: str = "chosen",
    specialist_args: Sequence[str] = (),
    generalist_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the specialists of one setting for one seed (finished ones reused) and score the combination.

    Args:
        seed: the seed of the generalist (its groups) and of the specialists.
        workdir: the study's directory (the generalist must be trained: :func:`train_generalist`).
        setting: ``overlap``, ``overlap_threshold``, ``epochs`` and ``soft_weight``.
        split: ``"val"`` (for choices) or ``"test"`` (the report).
        overrides: ``kd`` arguments of every run (the generalist's too) and of the evaluation.
        name: the setting's directory under ``seed<seed>/specialists/``.
        specialist_args: ``kd`` arguments of the specialists only, e.g. their own network
            (``--model.init_args.net.init_args.hidden=[8]``) and ``--model.init_args.init_from=scratch``.
        generalist_args: ``kd`` arguments of the generalist only (e.g. its clustering's number of groups).

    Returns:
        The report of :func:`~kd_lightning.workflows.specialists.evaluate_specialists` plus ``setting``,
        ``generalist`` (its checkpoint), ``groups_file`` and ``specialist_checkpoints`` (by group).
    """
    where = _seed_dir(Path(workdir), seed)
    generalist = train_generalist(seed, workdir, [*overrides, *generalist_args])
    out = where / "specialists" / name
    out.mkdir(parents=True, exist_ok=True)
    groups = overlap_groups(
        where / GROUPS_FILE, setting["overlap"], setting["overlap_threshold"], out / "groups.json"
    )
    args = [
        f"--seed_everything={seed}",
        f"{GENERALIST_ARG}={generalist.checkpoint}",
        f"{GROUPS_ARG}={groups.resolve()}",
        f"--trainer.max_epochs={setting['epochs']}",
        f"--model.init_args.soft_weight={setting['soft_weight']}",
        *QUIET,
        *overrides,
        *specialist_args,
    ]
    from kd_lightning.clustering import ClassGroups

    trained = [
        train_specialist(SPECIALIST_CONFIG, g, out, where, args)
        for g in range(len(ClassGroups.load(groups).groups))
    ]
    report = evaluate_specialists(SPECIALIST_CONFIG, out, where, args, split=split)  # type: ignore[arg-type]
    report["setting"] = dict(setting)
    report["generalist"] = generalist.checkpoint
    report["groups_file"] = str(groups.resolve())
    report["specialist_checkpoints"] = [r.checkpoint for r in trained]
    return report


def _candidates(base: dict[str, Any], key: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    return [{**base, **value} if isinstance(value, dict) else {**base, key: value} for value in values]


def _label(setting: dict[str, Any]) -> str:
    return (
        f"overlap{setting['overlap']}-t{setting['overlap_threshold']}"
        f"-e{setting['epochs']}-w{setting['soft_weight']}"
    )


def choose_settings(
    seed: int,
    workdir: str | Path,
    overlaps: Sequence[dict[str, Any]] = (
        {"overlap": 2, "overlap_threshold": 0.05},
        {"overlap": 3, "overlap_threshold": 0.05},
        {"overlap": 3, "overlap_threshold": 0.1},
    ),
    epochs: Sequence[int] = (5, 10, 20, 40),
    soft_weights: Sequence[float] = (0.0, 0.5),
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Choose overlap, specialist epochs and soft weight on the validation split, one at a time.

    Starting from :data:`SEARCH_START`, each round trains the specialists of every value of one
    setting (the others fixed at the best so far) and keeps the value whose KL combination is most
    accurate on the *validation* split (ties: the first listed). Test accuracy is never read. The record
    goes to ``seed<seed>/selection.json``.

    Args:
        seed: the one seed the choice is made on.
        workdir: the study's directory.
        overlaps: candidate ``{"overlap", "overlap_threshold"}`` pairs (all > 1: the study needs overlap).
        epochs: candidate specialist epochs.
        soft_weights: candidate soft-target weights.
        overrides: ``kd`` arguments of every run.

    Returns:
        ``{"seed", "chosen": setting, "rounds": [{"setting": key, "scores": {label: val acc}, "chosen": label}]}``.
    """
    best = dict(SEARCH_START)
    rounds = []
    scored: dict[str, float] = {}
    for key, values in (("overlap", overlaps), ("epochs", epochs), ("soft_weight", soft_weights)):
        candidates = {_label(s): s for s in _candidates(best, key, values)}
        scores = {}
        for label, setting in candidates.items():
            if label not in scored:
                report = specialists_run(seed, workdir, setting, "val", overrides, label)
                scored[label] = report["acc"]["kl"]
            scores[label] = scored[label]
        top = max(scores.values())
        chosen = next(label for label, score in scores.items() if score == top)
        best = candidates[chosen]
        rounds.append({"setting": key, "scores": scores, "chosen": chosen})
    record = {"seed": seed, "monitor": "validation accuracy of the KL combination", "chosen": best}
    record["rounds"] = rounds
    path = _seed_dir(Path(workdir), seed) / "selection.json"
    path.write_text(json.dumps(record, indent=2))
    return record


def split_tensors(split: str = "test", overrides: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """The inputs and labels of one split of the generalist config's data, and its source.

    Args:
        split: ``"test"`` or ``"train"`` (the whole training file, validation carve-out included).
        overrides: ``kd`` arguments of the runs (those of the data change it).

    Returns:
        ``(inputs (N, dim), labels (N,), the Synthetic source)``.
    """
    from kd_lightning.datamodules import Synthetic
    from kd_lightning.workflows.specialists import specialist_config

    source = specialist_config(GENERALIST_CONFIG, overrides).data.init_args.source
    data = Synthetic(**source.init_args.as_dict())
    x, y = data.load(split == "train")[0].tensors
    return x, y, data


def bayes_accuracy(split: str = "test", overrides: Sequence[str] = ()) -> float:
    """Accuracy of the nearest-true-mean rule on the config's data: the Bayes rule for its classes (equal
    priors, equal isotropic noise), hence the most any network can reach there.

    Args:
        split: ``"test"`` or ``"train"``.
        overrides: ``kd`` arguments of the runs (those of the data change it).
    """
    import torch

    x, y, data = split_tensors(split, overrides)
    means = torch.as_tensor(data.class_means(), dtype=torch.float32)
    return float((torch.cdist(x, means).argmin(1) == y).float().mean())


def capacity_study(
    seeds: Sequence[int],
    workdir: str | Path,
    setting: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    wide: bool = True,
) -> dict[str, Any]:
    """Generalist, wider reference, overlapping specialists and their combination, for each seed.

    Args:
        seeds: one generalist and one set of specialists per seed.
        workdir: the study's directory (``seed<seed>/`` each).
        setting: the specialists' setting; default :data:`DEFAULT_SETTING` (the shipped configs').
        overrides: ``kd`` arguments of every run (e.g. a small budget).
        wide: also train the wider reference generalist.

    Returns:
        ``{"setting", "seeds", "bayes_acc", "runs": [per seed: "seed", "generalist" (val/test acc, params),
        "wide" (same, or None), "report" (the test report of the combination)]}``.
    """
    setting = dict(DEFAULT_SETTING if setting is None else setting)
    runs = []
    for seed in seeds:
        generalist = train_generalist(seed, workdir, overrides)
        reference = train_generalist(seed, workdir, overrides, WIDE_HIDDEN) if wide else None
        report = specialists_run(seed, workdir, setting, "test", overrides)

        def summary(stage: StageResult) -> dict[str, Any]:
            return {
                "val_acc": stage.metrics.get("val/acc"),
                "test_acc": stage.test_acc,
                "params": stage.params,
            }

        runs.append(
            {
                "seed": seed,
                "generalist": summary(generalist),
                "wide": None if reference is None else summary(reference),
                "report": report,
            }
        )
    return {
        "setting": setting,
        "seeds": list(seeds),
        "bayes_acc": bayes_accuracy("test", overrides),
        "runs": runs,
    }


def pooled_table4(reports: Sequence[dict[str, Any]], top: int = 3) -> list[dict[str, Any]]:
    """Table 4 over seeds, with rows ``top`` and above merged (``"3+"``): test inputs summed, accuracies
    count-weighted; ``relative`` is the change in % of the generalist's accuracy, as in the paper.

    Example:
        >>> rows = [{"cover": k, "count": 10, "acc": {"generalist": 0.5, "kl": 0.6}} for k in (1, 3, 4)]
        >>> [(r["cover"], r["count"], round(r["relative"], 1)) for r in pooled_table4([{"by_cover": rows}])]
        [('1', 10, 20.0), ('3+', 20, 20.0)]
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        for row in r["by_cover"]:
            key = str(row["cover"]) if row["cover"] < top else f"{top}+"
            rows.setdefault(key, []).append(row)
    pooled = []
    for key, mine in rows.items():
        n = sum(row["count"] for row in mine)
        acc = {m: sum(row["acc"][m] * row["count"] for row in mine) / n for m in ("generalist", "kl")}
        relative = (
            100 * (acc["kl"] - acc["generalist"]) / acc["generalist"] if acc["generalist"] else float("nan")
        )
        pooled.append({"cover": key, "count": n, "acc": acc, "relative": relative})
    return sorted(pooled, key=lambda row: int(row["cover"].rstrip("+")))


def format_capacity_report(study: dict[str, Any]) -> str:
    """:func:`capacity_study`'s result as markdown: capacity evidence, accuracies per seed with mean ± std,
    the pooled Table 4 beside the paper's, and a verdict computed from the numbers."""
    runs = study["runs"]
    reports = [r["report"] for r in runs]
    s = study["setting"]
    lines = [
        f"setting: overlap {s['overlap']} (threshold {s['overlap_threshold']}), specialists {s['epochs']} "
        f"epochs, soft weight {s['soft_weight']}; seeds {study['seeds']}",
        "",
        "| seed | generalist val (%) | generalist test (%) | 64-unit reference test (%) | + specialists, KL test (%) "
        "| gain (points) | specialists | classes per group |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        g, w, rep = run["generalist"], run["wide"], run["report"]
        sizes = ",".join(str(len(x)) for x in rep["groups"])
        wide = f"{100 * w['test_acc']:.2f}" if w else "-"
        lines.append(
            f"| {run['seed']} | {100 * g['val_acc']:.2f} | {100 * rep['acc']['generalist']:.2f} | {wide} "
            f"| {100 * rep['acc']['kl']:.2f} | {100 * (rep['acc']['kl'] - rep['acc']['generalist']):+.2f} "
            f"| {len(rep['groups'])} | {sizes} |"
        )
    gen = [r["acc"]["generalist"] for r in reports]
    kl = [r["acc"]["kl"] for r in reports]
    gains = [b - a for a, b in zip(gen, kl, strict=True)]
    wides = [r["wide"]["test_acc"] for r in runs if r["wide"]]
    lines.append(
        f"| mean ± std | | {mean_std(gen)} | {mean_std(wides) if wides else '-'} | {mean_std(kl)} "
        f"| {mean_std(gains)} | | |"
    )
    lines += [
        "",
        f"Bayes accuracy (nearest true class mean) on the test split: {100 * study['bayes_acc']:.2f}%",
        "",
        "By how many specialists cover the true class (the paper's Table 4), test inputs summed over seeds:",
        "",
        "| specialists covering | test inputs | generalist (%) | + specialists (%) | change (points) "
        "| relative (%) | paper, relative (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = pooled_table4(reports)
    paper = dict(PAPER_TABLE4)
    paper["3+"] = f"{PAPER_TABLE4['3']:+.1f} (3) to {PAPER_TABLE4['10+']:+.1f} (10+)"  # type: ignore[assignment]
    for row in table:
        ref = paper.get(row["cover"], "-")
        ref_text = f"{ref:+.1f}" if isinstance(ref, float) else str(ref)
        gen_acc, kl_acc = row["acc"]["generalist"], row["acc"]["kl"]
        lines.append(
            f"| {row['cover']} | {row['count']} | {100 * gen_acc:.2f} | {100 * kl_acc:.2f} "
            f"| {100 * (kl_acc - gen_acc):+.2f} | {row['relative']:+.2f} | {ref_text} |"
        )
    lines += ["", verdict(study)]
    return "\n".join(lines)


def verdict(study: dict[str, Any]) -> str:
    """One paragraph computed from the numbers: does the combination gain on every seed, and does the
    gain grow with the number of covering specialists, as in the paper's Table 4?"""
    reports = [r["report"] for r in study["runs"]]
    gains = [r["acc"]["kl"] - r["acc"]["generalist"] for r in reports]
    covered = [row for row in pooled_table4(reports) if row["cover"] != "0"]
    relative = [row["relative"] for row in covered]
    grows = all(b > a for a, b in zip(relative, relative[1:], strict=False))
    wides = [r["wide"]["test_acc"] for r in study["runs"] if r["wide"]]
    gen = statistics.mean(r["acc"]["generalist"] for r in reports)
    parts = [
        f"Verdict: the specialists {'gain on every seed' if min(gains) > 0 else 'do not gain on every seed'} "
        f"(mean {100 * statistics.mean(gains):+.2f} points, smallest {100 * min(gains):+.2f})."
    ]
    if wides:
        parts.append(
            f"The generalist is capacity-limited: the 64-unit reference scores "
            f"{100 * (statistics.mean(wides) - gen):+.2f} points more on test."
        )
    parts.append(
        f"Coverage rows: {len(covered)} ({', '.join(row['cover'] for row in covered)}); relative gain by row "
        f"{', '.join(f'{g:+.1f}%' for g in relative)}: "
        + (
            "it grows with the number of covering specialists, as in the paper's Table 4."
            if grows
            else "it does not grow monotonically with the number of covering specialists, unlike the paper's Table 4."
        )
    )
    return " ".join(parts)


def capacity_demo(workdir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The study at a small budget, for a demonstration of a few minutes on two CPU cores: seeds
    :data:`DEMO_SEEDS`, the shipped setting with specialists of :data:`DEMO_EPOCHS` epochs, no choice.

    Args:
        workdir: the study's directory (a demo's own: its specialists differ from the full study's).
        overrides: ``kd`` arguments of every run.

    Returns:
        As :func:`capacity_study`.
    """
    return capacity_study(DEMO_SEEDS, workdir, {**DEFAULT_SETTING, "epochs": DEMO_EPOCHS}, overrides)
