"""Benchmark: generalist + specialists (Hinton et al. 2015, section 5) on planted groups and on Fashion-MNIST.

    python scripts/benchmark_specialists.py           # full: about 10 min on 2 cores with the main job's teacher
    python scripts/benchmark_specialists.py --quick   # smoke run of every step, about 2 min
    python scripts/benchmark_specialists.py --ari-only  # step 0 alone: no training, under a minute

0. Grouping methods on planted hierarchies (``kd_lightning.planted.planted_hierarchy``: uneven group
   sizes, a simulated generalist's predictions, no training): the adjusted Rand index of each
   grouping method of ``kd_lightning.clustering`` against the planted groups, per setting and seed.

1. Synthetic data with planted groups (``kd_lightning.datamodules.Synthetic``: 50 Gaussian classes in 10
   superclasses; labels permuted so the groups are not contiguous blocks). Per seed and for two
   generalist widths (one hidden layer of 16 or 64 units): an MLP generalist with the
   ConfusionClustering callback, the adjusted Rand index of its groups against the planted ones, one
   specialist per group (same MLP), and the combination.
2. Fashion-MNIST. The generalist is the main job's teacher (runs/fashion_mnist/teacher; trained with
   configs/fashion_mnist/teacher.yaml if missing); its groups come from
   ``kd validate --config configs/fashion_mnist/generalist.yaml``; the specialists from
   ``scripts/train_specialists.py --config configs/fashion_mnist/specialist.yaml`` with seeds 1, 2, 3.

Prints (does not assert) the groups, test accuracy of the generalist alone, of the KL combination and
of averaging the most confident specialists, the conditional accuracy on the specialists' classes,
accuracy by how many specialists cover the true class (the paper's Table 4), and the inference cost
(specialists run per input, FLOPs and wall time relative to the generalist alone). ``--quick`` writes
under runs/benchmark_specialists_quick/ and never touches runs/fashion_mnist/.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import train_specialists as ts  # noqa: E402

from kd_lightning.pipeline import run_stage, working_directory  # noqa: E402
from kd_lightning.planted import UNEVEN_SETTINGS  # noqa: E402
from kd_lightning.summary import mean_std  # noqa: E402

CONFIGS = ROOT / "configs" / "fashion_mnist"
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=8",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYNTHETIC_WIDTHS = (16, 64)
# Planted hierarchies for step 0 (label -> planted_hierarchy arguments); a test narrows them.
PLANTED_SETTINGS: dict[str, dict[str, Any]] = dict(UNEVEN_SETTINGS)


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


def grouping_ari(seeds: list[int]) -> list[dict[str, Any]]:
    """Adjusted Rand index of each grouping method against each planted hierarchy of PLANTED_SETTINGS.

    The matrix is the paper's covariance of the simulated generalist's predictions; every method
    clusters it into the planted number of groups, without size bounds.

    Returns:
        One row per (setting, seed): ``setting``, ``seed``, the generalist's ``accuracy``, the planted
        ``sizes`` and ``ari`` (method label -> adjusted Rand index).
    """
    from sklearn.metrics import adjusted_rand_score

    from kd_lightning.clustering import cluster_classes, groups_to_labels, prediction_covariance
    from kd_lightning.planted import planted_hierarchy

    methods = grouping_methods()
    rows = []
    for setting, kwargs in PLANTED_SETTINGS.items():
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


def print_ari_table(rows: list[dict[str, Any]]) -> None:
    """Print :func:`grouping_ari`'s rows as a markdown table, with each setting's worst seed."""
    methods = list(rows[0]["ari"])
    print("\n## Grouping methods on planted hierarchies: adjusted Rand index against the planted groups\n")
    print(f"| setting | seed | generalist acc. (%) | group sizes | {' | '.join(methods)} |")
    print(f"|---|---:|---:|---|{'---:|' * len(methods)}")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        for r in mine:
            sizes = ",".join(str(n) for n in r["sizes"])
            aris = " | ".join(f"{r['ari'][m]:.3f}" for m in methods)
            print(f"| {setting} | {r['seed']} | {100 * r['accuracy']:.1f} | {sizes} | {aris} |")
        worst = " | ".join(f"**{min(r['ari'][m] for r in mine):.3f}**" for m in methods)
        print(f"| {setting} | worst | | | {worst} |")


# --------------------------------------------------------------------------------------------------
# Synthetic data with planted groups


def synthetic_run(
    seed: int, out: Path, quick: bool, hidden: int = 64, specialist_epochs: int = 3, soft_weight: float = 0.0
) -> dict[str, Any]:
    """Generalist, clustering, specialists and combination on the planted-groups data, for one seed."""
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
        specialist = SpecialistModule(
            net,
            classes,
            shape,
            groups_file=str(out / "groups.json"),
            group=g,
            generalist_ckpt=str(out / "generalist.ckpt"),
            soft_weight=soft_weight,
            optimizer=partial(torch.optim.AdamW, lr=1e-3),
        )
        sdata = SpecialistDataModule(source, batch_size=128, eval_batch_size=1000, val_size=1000)
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
    """The main job's teacher checkpoint, trained here only if it is missing."""
    checkpoint = workdir / "runs" / "fashion_mnist" / "teacher" / "seed0" / "checkpoints" / "final.ckpt"
    if checkpoint.is_file():
        print(f"generalist: reusing {checkpoint}", flush=True)
        return checkpoint
    print("generalist: training configs/fashion_mnist/teacher.yaml", flush=True)
    overrides = [*QUICK, *QUIET] if quick else QUIET
    return Path(run_stage("generalist", CONFIGS / "teacher.yaml", workdir, overrides).checkpoint)


def fashion_mnist_groups(workdir: Path, generalist: Path, quick: bool) -> Path:
    """``kd validate --config generalist.yaml --ckpt_path <generalist>``: writes the groups file."""
    from kd_lightning.cli import main

    args = ["validate", "--config", str(CONFIGS / "generalist.yaml"), "--ckpt_path", str(generalist), *QUIET]
    if quick:
        args.append("--trainer.limit_val_batches=2")
    with working_directory(workdir), ts._cli_argv():
        main(args)
    return workdir / "runs" / "fashion_mnist" / "generalist" / "groups.json"


def fashion_mnist_run(
    seed: int, workdir: Path, generalist: Path, groups_file: Path, quick: bool, force: bool
) -> dict[str, Any]:
    from kd_lightning.clustering import ClassGroups

    config = CONFIGS / "specialist.yaml"
    out = workdir / "runs" / "benchmark_specialists" / "fashion_mnist" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"--seed_everything={seed}",
        f"{ts.GENERALIST_ARG}={generalist.resolve()}",
        f"{ts.GROUPS_ARG}={groups_file.resolve()}",
        f"--trainer.logger.init_args.save_dir={out}",
        *QUIET,
        *(QUICK if quick else []),
    ]
    groups = ClassGroups.load(groups_file)
    trained = [
        ts.train_specialist(config, g, out, workdir, overrides, force) for g in range(len(groups.groups))
    ]
    report = ts.evaluate(config, out, workdir, overrides)
    report["specialists"] = [
        {k: r[k] for k in ("group", "classes", "dustbin_correction", "fit_seconds", "metrics")}
        for r in trained
    ]
    return report


# --------------------------------------------------------------------------------------------------
# Tables


def pool_by_cover(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seeds' Table 4 rows pooled: per cover count, test inputs summed and accuracies count-weighted."""
    pooled = []
    for k in sorted({row["cover"] for r in reports for row in r["by_cover"]}):
        rows = [row for r in reports for row in r["by_cover"] if row["cover"] == k]
        n = sum(row["count"] for row in rows)
        acc = {m: sum(row["acc"][m] * row["count"] for row in rows) / n for m in ("generalist", "kl")}
        pooled.append({"cover": k, "count": n, "acc": acc})
    return pooled


def print_tables(
    title: str, seeds: list[int], reports: list[dict[str, Any]], picture: Path | None = None
) -> None:
    """Print the tables; with ``picture``, also draw the pooled Table 4 there (PNG)."""
    print(f"\n## {title}\n")
    if len({json.dumps(r["groups"]) for r in reports}) == 1:
        print("specialist groups:", "; ".join("{" + ", ".join(g) + "}" for g in reports[0]["named_groups"]))
    else:
        for seed, r in zip(seeds, reports, strict=True):
            print(
                f"specialist groups, seed {seed}:",
                "; ".join("{" + ", ".join(g) + "}" for g in r["named_groups"]),
            )
    if "ari" in reports[0]:
        print(
            "adjusted Rand index vs the planted groups:",
            ", ".join(f"{r['ari']:.3f}" for r in reports),
            f"(planted groups recovered exactly: {', '.join(str(r['planted_groups_found']) for r in reports)} of 10)",
        )
    print()
    print(
        "| seed | generalist (%) | + specialists, KL (%) | + specialists, average (%) | gain KL (points) "
        "| cond. generalist (%) | cond. KL (%) | specialists / input | FLOPs (x gen.) | wall time (x gen.) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed, r in zip(seeds, reports, strict=True):
        acc, cond, sec = r["acc"], r["cond_acc"], r["seconds"]
        print(
            f"| {seed} | {100 * acc['generalist']:.2f} | {100 * acc['kl']:.2f} | {100 * acc['average']:.2f} "
            f"| {100 * (acc['kl'] - acc['generalist']):+.2f} | {100 * cond['generalist']:.2f} | {100 * cond['kl']:.2f} "
            f"| {r['specialists_per_input']:.2f} | {r['cost']:.2f} | {sec['ensemble'] / max(sec['generalist'], 1e-9):.2f} |"
        )

    def col(key: str, sub: str) -> list[float]:
        return [r[key][sub] for r in reports]

    gains = [r["acc"]["kl"] - r["acc"]["generalist"] for r in reports]
    print(
        f"| mean ± std | {mean_std(col('acc', 'generalist'))} | {mean_std(col('acc', 'kl'))} "
        f"| {mean_std(col('acc', 'average'))} | {mean_std(gains)} | {mean_std(col('cond_acc', 'generalist'))} "
        f"| {mean_std(col('cond_acc', 'kl'))} | | | |"
    )
    print(
        f"\nconditional accuracy: on the {reports[0].get('cond_count', 0)} test inputs whose class some specialist "
        "covers, predictions restricted to the specialists' classes (the paper's Table 3)."
    )
    print("\nBy how many specialists cover the true class (the paper's Table 4), summed over seeds:\n")
    print("| specialists covering | test inputs | generalist (%) | KL (%) | change (points) | relative (%) |")
    print("|---:|---:|---:|---:|---:|---:|")
    pooled = pool_by_cover(reports)
    for row in pooled:
        k, n, gen, kl = row["cover"], row["count"], row["acc"]["generalist"], row["acc"]["kl"]
        rel = 100 * (kl - gen) / gen if gen else float("nan")
        print(f"| {k} | {n} | {100 * gen:.2f} | {100 * kl:.2f} | {100 * (kl - gen):+.2f} | {rel:+.2f} |")
    if picture is not None:
        from kd_lightning.plots import plot_specialist_breakdown

        acc = {name: statistics.mean(col("acc", name)) for name in ("generalist", "kl")}
        plot_specialist_breakdown(
            {"acc": acc, "by_cover": pooled}, picture, title=f"{title}, {len(seeds)} seeds"
        )
        print(f"\nTable 4 picture: {picture}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT, help="where runs/ is written (default: the repo)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, own directory")
    parser.add_argument("--skip-fashion-mnist", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--force", action="store_true", help="retrain what already finished")
    parser.add_argument(
        "--ari-only", action="store_true", help="only step 0: grouping methods on planted hierarchies"
    )
    args = parser.parse_args()
    # Lightning's per-run banners (devices, tips, summaries) would bury the tables.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    start = time.perf_counter()
    workdir = (args.workdir / "runs" / "benchmark_specialists_quick") if args.quick else args.workdir
    results: dict[str, Any] = {"quick": args.quick, "seeds": args.seeds}

    # Step 0 needs no training: five seeds at least, whatever --seeds says for the trained runs.
    ari_seeds = sorted(set(args.seeds) | set(range(5)))
    results["grouping_ari"] = grouping_ari(ari_seeds)
    print_ari_table(results["grouping_ari"])
    if args.ari_only:
        return

    if not args.skip_synthetic:
        # Two generalist widths: specialists add capacity where the generalist lacks it (16 hidden
        # units), and have little to add where it already nears the data's limit (64).
        for hidden in SYNTHETIC_WIDTHS:
            base = workdir / "runs" / "benchmark_specialists" / f"synthetic_mlp{hidden}"
            reports = [synthetic_run(seed, base / f"seed{seed}", args.quick, hidden) for seed in args.seeds]
            results[f"synthetic_mlp{hidden}"] = reports
            title = f"Synthetic: 50 classes in 10 planted groups, generalist and specialists MLP({hidden})"
            print_tables(title, args.seeds, reports, base / "table4.png")
            print(f"\nelapsed: {time.perf_counter() - start:.0f} s", flush=True)

    if not args.skip_fashion_mnist:
        from kd_lightning.datamodules import FashionMNIST

        if not FashionMNIST().available():
            print("\nFashion-MNIST files missing (run `make data`): skipped.")
        else:
            generalist = fashion_mnist_generalist(workdir, args.quick)
            groups_file = fashion_mnist_groups(workdir, generalist, args.quick)
            reports = [
                fashion_mnist_run(seed, workdir, generalist, groups_file, args.quick, args.force)
                for seed in args.seeds
            ]
            results["fashion_mnist"] = reports
            print_tables(
                "Fashion-MNIST: SmallCNN generalist (the main job's teacher)",
                args.seeds,
                reports,
                workdir / "runs" / "benchmark_specialists" / "fashion_mnist" / "table4.png",
            )
            for r in reports[:1]:
                print("\nper specialist (seed", args.seeds[0], "):")
                for s in r["specialists"]:
                    print(
                        f"  group {s['group']} {s['classes']}: test acc over its labels "
                        f"{100 * s['metrics'].get('test/acc', float('nan')):.2f}%, dustbin correction "
                        f"{s['dustbin_correction']:+.3f}, fit {s['fit_seconds']:.0f} s"
                    )

    print(f"\nwall time: {time.perf_counter() - start:.0f} s")
    out = workdir / "runs" / "benchmark_specialists" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
