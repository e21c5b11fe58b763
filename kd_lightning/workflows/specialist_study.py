"""The specialists benchmark's runs: grouping methods on planted hierarchies, generalist + specialists on
synthetic data with planted groups, and on Fashion-MNIST; and the tables that summarise them over seeds.

scripts/benchmark_specialists.py runs and prints them; the reproduction reuses the same runs. Every
function returns data or text; none prints except the Fashion-MNIST steps' one-line notes of what they
reuse or train.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from kd_lightning.planted import UNEVEN_SETTINGS
from kd_lightning.summary import mean_std
from kd_lightning.workflows import CONFIGS
from kd_lightning.workflows.specialists import (
    GENERALIST_ARG,
    GROUPS_ARG,
    evaluate_specialists,
    train_specialist,
)
from kd_lightning.workflows.stage import own_argv, run_stage, working_directory

QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=8",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
]
"""``kd`` arguments of a smoke run: every step, tiny budgets."""
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
"""``kd`` arguments that keep Lightning's bars and summaries out of the tables."""
PLANTED_SETTINGS: dict[str, dict[str, Any]] = dict(UNEVEN_SETTINGS)
"""Planted hierarchies of the grouping step: label -> ``planted_hierarchy`` arguments."""


# --------------------------------------------------------------------------------------------------
# Grouping methods on planted hierarchies (no training)


def grouping_methods() -> dict[str, Any]:
    """Label -> grouping of ``kd_lightning.clustering``: the default first, then the others."""
    from kd_lightning.clustering import KMeansGrouping, SpectralGrouping

    return {
        "spectral (default)": SpectralGrouping(),
        "spectral, no closure": SpectralGrouping(closure=False),
        "k-means, unit columns": KMeansGrouping(),
        "k-means, raw columns": KMeansGrouping(normalize=False),
    }


def grouping_ari(seeds: list[int], settings: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Adjusted Rand index of each grouping method against each planted hierarchy.

    The matrix is the paper's covariance of the simulated generalist's predictions; every method
    clusters it into the planted number of groups, without size bounds.

    Args:
        seeds: one planted hierarchy per setting and seed.
        settings: label -> ``planted_hierarchy`` arguments; default :data:`PLANTED_SETTINGS`.

    Returns:
        One row per (setting, seed): ``setting``, ``seed``, the generalist's ``accuracy``, the planted
        ``sizes`` and ``ari`` (method label -> adjusted Rand index).
    """
    from sklearn.metrics import adjusted_rand_score

    from kd_lightning.clustering import cluster_classes, groups_to_labels, prediction_covariance
    from kd_lightning.planted import planted_hierarchy

    methods = grouping_methods()
    rows = []
    for setting, kwargs in (PLANTED_SETTINGS if settings is None else settings).items():
        for seed in seeds:
            planted = planted_hierarchy(seed=seed, **kwargs)
            matrix = prediction_covariance(planted.probs)
            ari = {}
            for label, method in methods.items():
                groups = cluster_classes(matrix, kwargs["num_groups"], method)
                ari[label] = float(
                    adjusted_rand_score(planted.group_of, groups_to_labels(groups, kwargs["num_classes"]))
                )
            rows.append(
                {
                    "setting": setting,
                    "seed": seed,
                    "accuracy": planted.accuracy(),
                    "sizes": sorted(planted.sizes),
                    "ari": ari,
                }
            )
    return rows


def format_ari_table(rows: list[dict[str, Any]]) -> str:
    """:func:`grouping_ari`'s rows as a markdown table (with a title), with each setting's worst seed."""
    methods = list(rows[0]["ari"])
    lines = [
        "",
        "## Grouping methods on planted hierarchies: adjusted Rand index against the planted groups",
        "",
        f"| setting | seed | generalist acc. (%) | group sizes | {' | '.join(methods)} |",
        f"|---|---:|---:|---|{'---:|' * len(methods)}",
    ]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        for r in mine:
            sizes = ",".join(str(n) for n in r["sizes"])
            aris = " | ".join(f"{r['ari'][m]:.3f}" for m in methods)
            lines.append(f"| {setting} | {r['seed']} | {100 * r['accuracy']:.1f} | {sizes} | {aris} |")
        worst = " | ".join(f"**{min(r['ari'][m] for r in mine):.3f}**" for m in methods)
        lines.append(f"| {setting} | worst | | | {worst} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Synthetic data with planted groups


def synthetic_run(
    seed: int, out: Path, quick: bool, hidden: int = 64, specialist_epochs: int = 3, soft_weight: float = 0.0
) -> dict[str, Any]:
    """Generalist, clustering, specialists and combination on the planted-groups data, for one seed.

    The data is ``kd_lightning.datamodules.Synthetic`` (50 Gaussian classes in 10 superclasses) under a
    fixed label permutation, so that the groups are not contiguous blocks; generalist and specialists are
    MLPs with one hidden layer of ``hidden`` units.

    Args:
        seed: seeds the generalist (``seed``) and specialist ``g`` (``100 * seed + g``).
        out: directory of the checkpoints and the groups file.
        quick: a smoke run (2 generalist epochs, 1 specialist epoch, a few batches each).
        hidden: width of the MLPs' hidden layer.
        specialist_epochs: epochs of each specialist (without ``quick``).
        soft_weight: weight of the generalist's folded soft targets in the specialists' loss.

    Returns:
        The :class:`~kd_lightning.specialists.SpecialistEnsemble` report, plus ``seconds`` (generalist
        alone, ensemble), ``ari`` (found against planted groups), ``named_groups`` and
        ``planted_groups_found``.
    """
    import lightning as L
    import torch
    from sklearn.metrics import adjusted_rand_score

    from kd_lightning.callbacks.confusion_clustering import ConfusionClustering
    from kd_lightning.clustering import ClassGroups, groups_to_labels
    from kd_lightning.datamodules import IndexedDataModule, Synthetic
    from kd_lightning.datamodules.specialist import SpecialistDataModule
    from kd_lightning.models import MLP
    from kd_lightning.modules import ClassifierModule
    from kd_lightning.specialists import SpecialistEnsemble, SpecialistModule

    class PermutedSynthetic(Synthetic):
        """The planted groups under a fixed label permutation: no clustering bug can score by order.

        ``superclass_of`` is left alone (it places the class centres); ``planted`` is the superclass of
        each permuted label.
        """

        def __init__(self) -> None:
            super().__init__()
            self.perm = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(1234))
            inverse = torch.argsort(self.perm)  # permuted label -> original class
            self.planted = [self.superclass_of[int(inverse[c])] for c in range(self.num_classes)]
            self.class_names = [self.class_names[int(inverse[c])] for c in range(self.num_classes)]

        def load(self, train: bool):
            data, targets = super().load(train)
            x, y = data.tensors
            y = self.perm[y]
            return torch.utils.data.TensorDataset(x, y), y

    source = PermutedSynthetic()
    shape, classes = source.input_shape, source.num_classes
    net = partial(MLP, hidden=(hidden,))
    quiet = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    limits = dict(limit_train_batches=5, limit_val_batches=2, limit_test_batches=2) if quick else {}
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(seed)
    data = IndexedDataModule(source, batch_size=128, eval_batch_size=1000, val_size=1000)
    clustering = ConfusionClustering(10, str(out / "groups.json"))
    generalist = ClassifierModule(net, classes, shape, optimizer=partial(torch.optim.AdamW, lr=3e-3))
    trainer = L.Trainer(
        max_epochs=2 if quick else 15, callbacks=[clustering], enable_checkpointing=False, **quiet, **limits
    )
    trainer.fit(generalist, data)
    trainer.save_checkpoint(out / "generalist.ckpt")
    groups = ClassGroups.load(out / "groups.json")
    # The whole partition, before groups too small for a specialist were dropped from the file.
    partition = groups.source.get("partition", groups.groups)
    ari = float(adjusted_rand_score(source.planted, groups_to_labels(partition, classes)))

    checkpoints = []
    for g in range(len(groups.groups)):
        L.seed_everything(seed * 100 + g)
        # The data owns the specialist's classes (read from the groups file); the model takes them from it.
        sdata = SpecialistDataModule(
            source,
            batch_size=128,
            eval_batch_size=1000,
            val_size=1000,
            groups_file=str(out / "groups.json"),
            group=g,
        )
        specialist = SpecialistModule(
            net,
            classes,
            shape,
            classes=sdata.group_classes,
            groups_file=str(out / "groups.json"),
            group=g,
            generalist_ckpt=str(out / "generalist.ckpt"),
            soft_weight=soft_weight,
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
        )
        trainer = L.Trainer(
            max_epochs=1 if quick else specialist_epochs, enable_checkpointing=False, **quiet, **limits
        )
        trainer.fit(specialist, sdata)
        trainer.save_checkpoint(out / f"group{g}.ckpt")
        checkpoints.append(str(out / f"group{g}.ckpt"))

    ensemble = SpecialistEnsemble(str(out / "generalist.ckpt"), checkpoints, str(out / "groups.json"))
    tester = L.Trainer(**quiet, limit_test_batches=limits.get("limit_test_batches", 1.0))
    start = time.perf_counter()
    tester.test(generalist, data, verbose=False)
    generalist_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tester.test(ensemble, data, verbose=False)
    report = dict(ensemble.report)
    report["seconds"] = {"generalist": generalist_seconds, "ensemble": time.perf_counter() - start}
    report["ari"] = ari
    report["named_groups"] = groups.named_groups()
    report["planted_groups_found"] = int(
        sum(len({source.planted[c] for c in g}) == 1 and len(g) == 5 for g in groups.groups)
    )
    return report


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def fashion_mnist_generalist(workdir: Path, quick: bool) -> Path:
    """The main job's teacher checkpoint, trained here only if it is missing.

    Args:
        workdir: where ``runs/fashion_mnist/teacher`` is (or goes).
        quick: train a missing teacher with :data:`QUICK`'s budget.

    Returns:
        The checkpoint (``.../seed0/checkpoints/final.ckpt``).
    """
    checkpoint = workdir / "runs" / "fashion_mnist" / "teacher" / "seed0" / "checkpoints" / "final.ckpt"
    if checkpoint.is_file():
        print(f"generalist: reusing {checkpoint}", flush=True)
        return checkpoint
    print("generalist: training configs/fashion_mnist/teacher.yaml", flush=True)
    overrides = [*QUICK, *QUIET] if quick else QUIET
    config = CONFIGS / "fashion_mnist" / "teacher.yaml"
    return Path(run_stage("generalist", config, workdir, overrides).checkpoint)


def fashion_mnist_groups(workdir: Path, generalist: Path, quick: bool) -> Path:
    """``kd validate --config generalist.yaml --ckpt_path <generalist>``: writes the groups file.

    Args:
        workdir: where the config's relative paths resolve.
        generalist: the generalist's checkpoint.
        quick: validate on 2 batches only.

    Returns:
        The groups file (``workdir/runs/fashion_mnist/generalist/groups.json``).
    """
    from kd_lightning.cli import main

    config = CONFIGS / "fashion_mnist" / "generalist.yaml"
    args = ["validate", "--config", str(config), "--ckpt_path", str(generalist), *QUIET]
    if quick:
        args.append("--trainer.limit_val_batches=2")
    with working_directory(workdir), own_argv():
        main(args)
    return workdir / "runs" / "fashion_mnist" / "generalist" / "groups.json"


def fashion_mnist_run(
    seed: int, workdir: Path, generalist: Path, groups_file: Path, quick: bool, force: bool
) -> dict[str, Any]:
    """Every specialist of ``groups_file`` for one seed (finished ones reused), and their combination.

    Args:
        seed: the specialists' ``--seed_everything``; they go to
            ``workdir/runs/benchmark_specialists/fashion_mnist/seed<seed>``.
        workdir: where relative paths resolve.
        generalist: the generalist's checkpoint.
        groups_file: the groups (one specialist each).
        quick: :data:`QUICK`'s budget.
        force: retrain finished specialists.

    Returns:
        The report of :func:`~kd_lightning.workflows.specialists.evaluate_specialists`, plus
        ``specialists``: per group its ``group``, ``classes``, ``dustbin_correction``, ``fit_seconds``
        and test ``metrics``.
    """
    from kd_lightning.clustering import ClassGroups

    config = CONFIGS / "fashion_mnist" / "specialist.yaml"
    out = workdir / "runs" / "benchmark_specialists" / "fashion_mnist" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"--seed_everything={seed}",
        f"{GENERALIST_ARG}={generalist.resolve()}",
        f"{GROUPS_ARG}={groups_file.resolve()}",
        f"--trainer.logger.init_args.save_dir={out}",
        *QUIET,
        *(QUICK if quick else []),
    ]
    groups = ClassGroups.load(groups_file)
    trained = [
        train_specialist(config, g, out, workdir, overrides, force).record()
        for g in range(len(groups.groups))
    ]
    report = evaluate_specialists(config, out, workdir, overrides)
    report["specialists"] = [
        {k: r[k] for k in ("group", "classes", "dustbin_correction", "fit_seconds", "metrics")}
        for r in trained
    ]
    return report


# --------------------------------------------------------------------------------------------------
# Tables


def pool_by_cover(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seeds' Table 4 rows pooled: per cover count, test inputs summed and accuracies count-weighted.

    Args:
        reports: one specialists report per seed (each with ``by_cover`` rows).

    Returns:
        One row per cover count, ascending: ``cover``, ``count`` and ``acc`` (``generalist``, ``kl``).
    """
    pooled = []
    for k in sorted({row["cover"] for r in reports for row in r["by_cover"]}):
        rows = [row for r in reports for row in r["by_cover"] if row["cover"] == k]
        n = sum(row["count"] for row in rows)
        acc = {m: sum(row["acc"][m] * row["count"] for row in rows) / n for m in ("generalist", "kl")}
        pooled.append({"cover": k, "count": n, "acc": acc})
    return pooled


def format_tables(title: str, seeds: list[int], reports: list[dict[str, Any]]) -> str:
    """The seeds' reports as markdown: groups, one row per seed with mean ± std, and the pooled Table 4."""
    lines = [f"\n## {title}\n"]
    if len({json.dumps(r["groups"]) for r in reports}) == 1:
        lines.append(
            "specialist groups: " + "; ".join("{" + ", ".join(g) + "}" for g in reports[0]["named_groups"])
        )
    else:
        for seed, r in zip(seeds, reports, strict=True):
            lines.append(
                f"specialist groups, seed {seed}: "
                + "; ".join("{" + ", ".join(g) + "}" for g in r["named_groups"])
            )
    if "ari" in reports[0]:
        lines.append(
            "adjusted Rand index vs the planted groups: "
            + ", ".join(f"{r['ari']:.3f}" for r in reports)
            + f" (planted groups recovered exactly: {', '.join(str(r['planted_groups_found']) for r in reports)} of 10)"
        )
    lines += [
        "",
        "| seed | generalist (%) | + specialists, KL (%) | + specialists, average (%) | gain KL (points) "
        "| cond. generalist (%) | cond. KL (%) | specialists / input | FLOPs (x gen.) | wall time (x gen.) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in zip(seeds, reports, strict=True):
        acc, cond, sec = r["acc"], r["cond_acc"], r["seconds"]
        lines.append(
            f"| {seed} | {100 * acc['generalist']:.2f} | {100 * acc['kl']:.2f} | {100 * acc['average']:.2f} "
            f"| {100 * (acc['kl'] - acc['generalist']):+.2f} | {100 * cond['generalist']:.2f} | {100 * cond['kl']:.2f} "
            f"| {r['specialists_per_input']:.2f} | {r['cost']:.2f} | {sec['ensemble'] / max(sec['generalist'], 1e-9):.2f} |"
        )

    def col(key: str, sub: str) -> list[float]:
        return [r[key][sub] for r in reports]

    gains = [r["acc"]["kl"] - r["acc"]["generalist"] for r in reports]
    lines += [
        f"| mean ± std | {mean_std(col('acc', 'generalist'))} | {mean_std(col('acc', 'kl'))} "
        f"| {mean_std(col('acc', 'average'))} | {mean_std(gains)} | {mean_std(col('cond_acc', 'generalist'))} "
        f"| {mean_std(col('cond_acc', 'kl'))} | | | |",
        f"\nconditional accuracy: on the {reports[0].get('cond_count', 0)} test inputs whose class some specialist "
        "covers, predictions restricted to the specialists' classes (the paper's Table 3).",
        "\nBy how many specialists cover the true class (the paper's Table 4), summed over seeds:\n",
        "| specialists covering | test inputs | generalist (%) | KL (%) | change (points) | relative (%) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in pool_by_cover(reports):
        k, n, gen, kl = row["cover"], row["count"], row["acc"]["generalist"], row["acc"]["kl"]
        rel = 100 * (kl - gen) / gen if gen else float("nan")
        lines.append(
            f"| {k} | {n} | {100 * gen:.2f} | {100 * kl:.2f} | {100 * (kl - gen):+.2f} | {rel:+.2f} |"
        )
    return "\n".join(lines)


def plot_pooled(title: str, seeds: list[int], reports: list[dict[str, Any]], picture: Path) -> Path:
    """Draw the pooled Table 4 of the seeds' reports (PNG at ``picture``), with the seeds' mean accuracies."""
    import statistics

    from kd_lightning.plots import plot_specialist_breakdown

    acc = {name: statistics.mean(r["acc"][name] for r in reports) for name in ("generalist", "kl")}
    return plot_specialist_breakdown(
        {"acc": acc, "by_cover": pool_by_cover(reports)}, picture, title=f"{title}, {len(seeds)} seeds"
    )
