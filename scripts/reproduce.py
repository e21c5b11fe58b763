"""Reproduce, at small scale and offline, the experiments of Hinton, Vinyals & Dean (2015), and write a report.

    OMP_NUM_THREADS=1 python scripts/reproduce.py           # or: make reproduce (1 thread; ~17 min reusing, ~70 fresh)
    OMP_NUM_THREADS=1 python scripts/reproduce.py --quick   # tiny epochs and subsets: plumbing check

Writes docs/reproduction.md and its pictures under docs/reproduction/. Every number in the report is one
this run computed and printed to stdout; each experiment puts the paper's number beside ours.

Experiments (the paper's MNIST/speech numbers are quoted from Hinton, Vinyals & Dean (2015), sections 3-4):

1. gap closure: teacher, student alone, distilled student, on Fashion-MNIST (teacher: the main job's
   ``configs/fashion_mnist/teacher.yaml`` stage; students: scripts/benchmark_kd.py's runs, reused) and on
   MNIST-1D (a 1-D CNN teacher vs an MLP), plus a label-free student on a transfer set of generated signals.
2. temperature sweep for a large (800-800) and a tiny (30-30) MLP student.
3. omitted class: the transfer set lacks class 3; the class-3 bias is chosen on validation data only.
4. soft targets as a regulariser: 3% of the training data, hard (early-stopped on validation) vs soft.
5. ensembles: 4 MLP members of member.yaml (those of scripts/study_ensembles.py --family mlp, so finished
   stages are reused) and students of distill_ensemble.yaml (CNN members: docs/ensembles.md).
6. generalist + specialists: scripts/benchmark_specialists.py's planted-groups and Fashion-MNIST runs.

The experiments themselves are library functions (:mod:`kd_lightning.workflows.reproduction`); this script
runs them in order, with the recipes below, and writes the report. Teachers are checkpoints (the main
job's stage, or a 1-D CNN fitted here with a ModelCheckpoint); the distilled students read the teacher's
fp32 logits from soft-target stores that the SoftTargetCache callback builds once per training split,
under ``<workdir>/runs/reproduce/stores/`` (reused by later runs while teacher and data are unchanged),
so a distilled student costs what a plain student costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

from kd_lightning.datamodules import MNIST1D, ExtraTraining, FashionMNIST, IndexedDataModule
from kd_lightning.ensemble import predict_logits
from kd_lightning.models import CNN1D
from kd_lightning.summary import mean_std
from kd_lightning.workflows.regimes import run_regime
from kd_lightning.workflows.reproduction import (
    Budget,
    SoftTargets,
    distillation_recipe,
    fit_teacher,
    gap_closed,
    gap_closure,
    omitted_class,
    regulariser,
    temperature_sweep,
    transfer_set,
)
from kd_lightning.workflows.specialist_study import (
    fashion_mnist_generalist,
    fashion_mnist_groups,
    fashion_mnist_run,
    pool_by_cover,
    synthetic_run,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "fashion_mnist"
MEMBERS_OUT = "runs/fashion_mnist/members/member"
DOCS = ROOT / "docs"
FIGURES = DOCS / "reproduction"
# The in-memory Fashion-MNIST students follow the shipped student configs' optimizer and schedule; the
# paper's T=20 with a small hard-label weight is kept where the experiment is the paper's own.
FM_FIT: dict[str, Any] = {"lr": 1e-3, "weight_decay": 5e-4, "one_cycle": True}
# MNIST-1D: the teacher's logits are large (it fits its training set); at lr 1e-3 for 60 epochs the
# distilled MLP underfit them and gained nothing, at 3e-3 for 100 epochs it matches them.
M1_FIT: dict[str, Any] = {"lr": 3e-3, "temperature": 20.0, "hard_weight": 0.1}
# Relative gain in test accuracy by the number of specialists covering the true class (paper's Table 4).
PAPER_TABLE4 = {0: "0.0%", 1: "+3.4%", 2: "+7.4%", 3: "+8.8%", 4: "+10.5%", 5: "+11.1%"}


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Markdown sections and the wall time of each experiment."""

    sections: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.sections.append(text)


def _closed_words(closed: float) -> str:
    if closed != closed:  # nan
        return "the teacher makes no fewer errors than the student alone here, so there is no gap to close."
    verdict = "soft targets close most of the gap, as in the paper" if closed > 0.5 else "less than the paper"
    return f"distillation closes {100 * closed:.0f}% of the teacher-student error gap (paper: (146-74)/(146-67) = 91%); {verdict}."


def _fit_words(fit: dict[str, Any]) -> str:
    schedule = "one-cycle schedule" if fit.get("one_cycle") else "constant lr"
    return f"AdamW lr {fit['lr']:g}, weight decay {fit.get('weight_decay', 0.0):g}, {schedule}"


def fmnist_gap(
    teacher: Any, workdir: Path, overrides: list[str], seeds: Sequence[int], n_test: int
) -> dict[str, Any]:
    """Fashion-MNIST gap closure: scripts/benchmark_kd.py's ``full`` regime (students of the shipped
    student.yaml and distill_cached.yaml), reused when finished, so the two scripts never disagree."""
    alone, distilled = run_regime("full", list(seeds), teacher, workdir, overrides)

    def row(acc: float) -> tuple[int, float]:
        return round((1.0 - acc) * n_test), acc

    return {
        "name": "Fashion-MNIST (CNN -> MLP 800-800)",
        "teacher": row(teacher.test_acc),
        "alone": [row(r.test_acc) for r in alone],
        "distilled": [row(r.test_acc) for r in distilled],
        "n_test": n_test,
    }


def _regulariser_sentence(reg: dict[str, float]) -> str:
    """One sentence comparing the share of the 3%-vs-100% gap that soft targets recover with the paper's."""
    gap = reg["hard_full"] - reg["hard_small"]
    if gap <= 0:
        return (
            "- Here 3% of the data with hard labels did not trail 100% (gap "
            f"{100 * gap:+.2f} points), so the paper's comparison (87% of the gap recovered) does not apply "
            "to this run.\n"
        )
    share = (reg["soft_small"] - reg["hard_small"]) / gap
    verdict = "we agree: soft targets recover most of it" if share > 0.5 else "we recover less than the paper"
    return (
        f"- Soft targets recover {100 * share:.0f}% of the gap between 3% and 100% of the data with hard labels "
        f"(paper: (57.0-44.5)/(58.9-44.5) = 87%); {verdict}.\n"
    )


def ensembles(
    workdir: Path, overrides: list[str], members: int = 4, seeds: Sequence[int] = (100, 101, 102)
) -> dict:
    """The MLP members (member.yaml), their ensemble and distilled students, reused when finished."""
    from kd_lightning.ensemble import Ensemble, classification_metrics
    from kd_lightning.workflows.members import seed_overrides, train_members
    from kd_lightning.workflows.stage import run_stage

    print("ensembles: training (or reusing) the MLP members of member.yaml ...", flush=True)
    ms = train_members(CONFIGS / "member.yaml", range(members), MEMBERS_OUT, workdir, overrides=overrides)
    checkpoints = [m.checkpoint for m in ms]
    ensemble = Ensemble(checkpoints=checkpoints, rule="mean_probs")
    dm = IndexedDataModule(FashionMNIST(), batch_size=1000, eval_batch_size=1000, val_size=5000)
    dm.setup("test")
    ens = classification_metrics(*predict_logits(ensemble, dm.test_dataloader()))["acc"]
    teacher_arg = "--model.init_args.teacher.init_args.checkpoints=[" + ",".join(checkpoints) + "]"
    print("ensembles: distilling (or reusing) the students ...", flush=True)
    students = [
        run_stage(
            f"distilled student (seed {seed})",
            CONFIGS / "distill_ensemble.yaml",
            workdir,
            [*overrides, teacher_arg, *seed_overrides(seed, "runs/fashion_mnist/distill_ensemble")],
        )
        for seed in seeds
    ]
    return {"members": [m.test_acc for m in ms], "ensemble": ens, "students": [s.test_acc for s in students]}


def specialists(workdir: Path, quick: bool, seeds: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """Generalist + specialists of scripts/benchmark_specialists.py: planted groups (MLP 16) and
    Fashion-MNIST (the main job's teacher as generalist; finished specialists are reused)."""
    out = workdir / "runs" / "reproduce" / "specialists_synthetic"
    synthetic = [synthetic_run(seed, out / f"seed{seed}", quick, hidden=16) for seed in seeds]
    generalist = fashion_mnist_generalist(workdir, quick)
    groups = fashion_mnist_groups(workdir, generalist, quick)
    fmnist = [fashion_mnist_run(seed, workdir, generalist, groups, quick, False) for seed in seeds]
    return {"synthetic": synthetic, "fashion_mnist": fmnist}


def _specialist_verdict(reports: list[dict[str, Any]]) -> str:
    """Whether the specialists help, as in the paper, and whether the help grows with coverage (Table 4)."""
    gains = [r["acc"]["kl"] - r["acc"]["generalist"] for r in reports]
    words = f"the specialists change test accuracy by {mean_std(gains, sample=False)} points; " + (
        "like the paper, they help" if min(gains) > 0 else "unlike the paper, they do not help on every seed"
    )
    pooled = pool_by_cover(reports)
    covered = [row for row in pooled if row["cover"] > 0]
    if len(covered) == len(pooled) == 1:
        k = covered[0]["cover"]
        words += (
            f"; every class is covered by exactly {k} specialist{'s' if k > 1 else ''}: conditional accuracy "
            "equals test accuracy and Table 4 has a single row (ConfusionClustering's `overlap` > 1 would let "
            "groups overlap, as the paper's do)"
        )
    rel = [
        (r["acc"]["kl"] - r["acc"]["generalist"]) / r["acc"]["generalist"]
        for r in covered
        if r["acc"]["generalist"]
    ]
    if len(rel) > 1:
        grows = all(b >= a for a, b in pairwise(rel))
        words += (
            "; the gain grows with the number of covering specialists, as in Table 4"
            if grows
            else ("; the gain does not grow steadily with the number of covering specialists")
        )
    ari = [r["ari"] for r in reports if "ari" in r]
    if ari:
        words += f". Adjusted Rand index of the discovered groups vs the planted ones: {mean_std(ari, scale=1.0, digits=3, sample=False)}"
    return words + "."


def _specialist_lines(title: str, reports: list[dict[str, Any]], picture: str) -> list[str]:
    """One dataset's rows of the specialists section: Table 3 (overall and conditional) and Table 4."""

    def col(key: str, sub: str) -> list[float]:
        return [r[key][sub] for r in reports]

    gen, kl = statistics.fmean(col("acc", "generalist")), statistics.fmean(col("acc", "kl"))
    cgen, ckl = statistics.fmean(col("cond_acc", "generalist")), statistics.fmean(col("cond_acc", "kl"))
    lines = [
        f"**{title}** ({len(reports)} seeds; groups of the first seed: "
        + "; ".join("{" + ", ".join(g) + "}" for g in reports[0]["named_groups"])
        + ")\n",
        "| | generalist (%) | + specialists, KL (%) | relative change |",
        "|---|---:|---:|---:|",
        f"| test accuracy | {mean_std(col('acc', 'generalist'), sample=False)} | {mean_std(col('acc', 'kl'), sample=False)} "
        f"| {100 * (kl - gen) / gen:+.1f}% (paper +4.4%) |",
        f"| conditional accuracy | {mean_std(col('cond_acc', 'generalist'), sample=False)} | {mean_std(col('cond_acc', 'kl'), sample=False)} "
        f"| {100 * (ckl - cgen) / cgen:+.1f}% (paper 43.1 -> 45.9: +6.5%) |",
        "",
        "| specialists covering the true class | test inputs (all seeds) | generalist (%) | KL (%) | relative change | paper |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in pool_by_cover(reports):
        k, g, c = row["cover"], row["acc"]["generalist"], row["acc"]["kl"]
        rel = f"{100 * (c - g) / g:+.1f}%" if g else "n/a"
        lines.append(
            f"| {k} | {row['count']} | {100 * g:.2f} | {100 * c:.2f} | {rel} | {PAPER_TABLE4.get(k, '')} |"
        )
    lines.append(f"\n![{title}]({picture})\n")
    return lines


# ----------------------------------------------------------------------------------------------- figures


def _plot_gap(results: list[dict[str, Any]], path: Path) -> Path:
    from kd_lightning.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        labels = ["teacher", "student alone", "distilled"]
        means = [r["teacher"][1]] + [statistics.fmean(a for _, a in r[k]) for k in ("alone", "distilled")]
        stds = [0.0] + [statistics.pstdev([a for _, a in r[k]]) for k in ("alone", "distilled")]
        ax.bar(labels, [100 * m for m in means], yerr=[100 * s for s in stds], color=["C0", "C1", "C2"])
        ax.set_ylim(100 * min(means) - 5, 100)
        ax.set_title(r["name"])
        ax.set_ylabel("test accuracy (%)")
    return save_figure(fig, path)


def _plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    from kd_lightning.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label in dict.fromkeys(r["student"] for r in rows):
        sub = [r for r in rows if r["student"] == label]
        ax.plot([r["T"] for r in sub], [100 * r["acc"] for r in sub], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    return save_figure(fig, path)


def _plot_specialists(reports: list[dict[str, Any]], title: str, path: Path) -> Path:
    from kd_lightning.plots import plot_specialist_breakdown

    acc = {m: statistics.fmean(r["acc"][m] for r in reports) for m in ("generalist", "kl")}
    return plot_specialist_breakdown(
        {"acc": acc, "by_cover": pool_by_cover(reports)}, path, title=f"{title}, {len(reports)} seeds"
    )


def _plot_bias(r: dict[str, Any], path: Path) -> Path:
    from kd_lightning.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(r["grid"], [100 * a for a in r["val_accs"]], "o-")
    ax.axvline(r["bias"], color="k", ls="--", label=f"chosen on validation: {r['bias']:+.1f}")
    ax.set_xlabel(f"shift of class {r['cls']}'s bias")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- main


def _fmnist_teacher(workdir: Path, overrides: list[str]) -> Any:
    from kd_lightning.workflows.stage import run_stage

    print(
        "Fashion-MNIST teacher: the main job's stage (reused when finished; else trained now) ...", flush=True
    )
    return run_stage("teacher (CNN)", CONFIGS / "teacher.yaml", workdir, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where runs/ is written (default: the repo; --quick: runs/reproduce_quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny epochs and subsets (plumbing check)")
    parser.add_argument(
        "--out", default=None, help="the report (default: docs/reproduction.md; --quick: under its workdir)"
    )
    parser.add_argument("overrides", nargs="*", help="kd arguments for every pipeline stage, after --")
    args = parser.parse_args()
    overrides = list(args.overrides)
    budget = Budget.quick() if args.quick else Budget()
    if args.quick:
        overrides += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=50"]
    sys.argv = sys.argv[:1]  # LightningCLI warns when it sees this script's arguments
    # A quick run must never overwrite the main job's stages or the committed report.
    default_workdir = ROOT / "runs" / "reproduce_quick" if args.quick else ROOT
    workdir = Path(args.workdir) if args.workdir else default_workdir
    out = (
        Path(args.out)
        if args.out
        else (workdir / "reproduction.md" if args.quick else DOCS / "reproduction.md")
    )
    figures = out.parent / out.stem
    report = Report()
    report.add(
        "# Reproducing Hinton, Vinyals & Dean (2015) at small scale\n\n"
        f"Written by `scripts/reproduce.py{' --quick' if args.quick else ''}`; every number below is one "
        "that run printed. Errors are counted on the test split; ± is the population std over seeds.\n"
    )
    fm_kwargs = {"batch_size": 128, "eval_batch_size": 1000, "val_size": 5000}
    m1_kwargs = {"batch_size": 64, "eval_batch_size": 1000, "val_size": 0.1}
    fmnist = FashionMNIST()

    # 1. gap closure
    t0 = time.perf_counter()
    fm_stage = _fmnist_teacher(workdir, overrides)
    # One soft-target store per training split (each experiment's), so that none replaces another.
    stores = workdir / "runs" / "reproduce" / "stores"
    fm_dm = IndexedDataModule(fmnist, **fm_kwargs)
    fm_dm.setup("test")
    print(
        "Fashion-MNIST students: scripts/benchmark_kd.py's full regime (reused when finished) ...", flush=True
    )
    fm_gap = fmnist_gap(fm_stage, workdir, overrides, budget.fmnist_seeds, len(fm_dm.test_set))
    mnist1d = MNIST1D(num_samples=budget.mnist1d_samples)
    print("MNIST-1D: the 1-D CNN teacher ...", flush=True)
    m1_teacher = fit_teacher(
        partial(CNN1D, channels=64),
        mnist1d,
        budget.mnist1d_teacher_epochs,
        budget,
        m1_kwargs,
        workdir / "runs" / "reproduce" / "mnist1d_teacher",
        lr=3e-3,
    )
    m1_hidden = (256, 256)
    print("MNIST-1D: students alone and distilled ...", flush=True)
    m1_gap = gap_closure(
        f"MNIST-1D (1-D CNN -> MLP {'-'.join(map(str, m1_hidden))})",
        mnist1d,
        SoftTargets(m1_teacher, stores / "mnist1d"),
        m1_hidden,
        budget.mnist1d_epochs,
        budget,
        m1_kwargs,
        M1_FIT,
    )
    generated = MNIST1D(num_samples=budget.mnist1d_generated, seed=43)
    print("MNIST-1D: a transfer set with generated signals ...", flush=True)
    m1_transfer = transfer_set(
        ExtraTraining(mnist1d, generated),
        SoftTargets(m1_teacher, stores / "mnist1d_transfer"),
        m1_hidden,
        budget.transfer_epochs,
        budget,
        m1_kwargs,
        M1_FIT,
    )
    gaps = [fm_gap, m1_gap]
    lines = [
        "## 1. Gap closure: teacher, student alone, distilled student\n",
        "Paper (MNIST, 10,000 test images): teacher 67 errors, student alone 146, distilled (T=20) 74.\n",
        f"- Fashion-MNIST: teacher `configs/fashion_mnist/teacher.yaml` (the main job's); students "
        f"`student.yaml` and `distill_cached.yaml` ({distillation_recipe(CONFIGS / 'distill_cached.yaml')}), seeds "
        f"{', '.join(map(str, budget.fmnist_seeds))}: the runs of `scripts/benchmark_kd.py`, reused.",
        f"- MNIST-1D ({budget.mnist1d_samples} signals, 80% train): teacher a 1-D CNN "
        f"({budget.mnist1d_teacher_epochs} epochs); students MLP {'-'.join(map(str, m1_hidden))}, "
        f"{budget.mnist1d_epochs} epochs, AdamW lr {M1_FIT['lr']:g} constant, distilled at "
        f"T={M1_FIT['temperature']:g} with hard-label weight {M1_FIT['hard_weight']:g}; seeds "
        f"{', '.join(map(str, budget.seeds))}.\n",
        "| data | model | test errors | test acc (%) |",
        "|---|---|---:|---:|",
    ]
    for g in gaps:
        lines.append(f"| {g['name']} | teacher | {g['teacher'][0]} | {100 * g['teacher'][1]:.2f} |")
        for k, label in (("alone", "student alone"), ("distilled", "distilled student")):
            lines.append(
                f"| {g['name']} | {label} | {mean_std([e for e, _ in g[k]], scale=1.0, digits=1, sample=False)} | {mean_std([a for _, a in g[k]], sample=False)} |"
            )
    n_extra = m1_transfer["n_train"]
    for key, label in (
        ("soft", "distilled on the larger transfer set, no labels (hard weight 0)"),
        ("labels", "trained on the larger transfer set's true labels"),
    ):
        e, a = m1_transfer[key]
        lines.append(
            f"| MNIST-1D + generated signals ({n_extra} training inputs) | {label} | {e} | {100 * a:.2f} |"
        )
    lines.append("")
    for g in gaps:
        closed = gap_closed(g["teacher"][0], [e for e, _ in g["alone"]], [e for e, _ in g["distilled"]])
        lines.append(f"- {g['name']}: {_closed_words(closed)}")
    closed = gap_closed(m1_gap["teacher"][0], [e for e, _ in m1_gap["alone"]], [m1_transfer["soft"][0]])
    soft_acc, label_acc = m1_transfer["soft"][1], m1_transfer["labels"][1]
    lines.append(
        f"- MNIST-1D with a larger transfer set (one seed): the training file plus the training split of "
        f"{budget.mnist1d_generated} signals generated with another seed; {n_extra} inputs train once the "
        f"validation split is held out. Distilled for {budget.transfer_epochs} epochs without a single label: "
        f"{_closed_words(closed)} The transfer set need not be labelled (the paper: "
        'it "could consist entirely of unlabeled data"). Trained on the true labels of the same inputs it '
        f"reaches {100 * label_acc:.2f}%, "
        + (
            "so here labels, where one has them, are worth more than the teacher's targets."
            if label_acc > soft_acc
            else f"no better than the label-free distilled student ({100 * soft_acc:.2f}%)."
        )
    )
    _plot_gap(gaps, figures / "gap_closure.png")
    lines.append(f"\n![gap closure]({figures.name}/gap_closure.png)\n")
    report.add("\n".join(lines))
    report.seconds["gap closure"] = time.perf_counter() - t0

    # 2. temperature sweep (on a fraction of Fashion-MNIST, to fit the budget)
    t0 = time.perf_counter()
    sweep = temperature_sweep(
        fmnist,
        SoftTargets(fm_stage.checkpoint, stores / "fashion_mnist_sweep"),
        {"MLP 800-800": (800, 800), "MLP 30-30": (30, 30)},
        budget.temperatures,
        budget.sweep_epochs,
        budget,
        {**fm_kwargs, "train_fraction": budget.sweep_fraction},
        fit=FM_FIT,
    )
    lines = [
        "## 2. Temperature sweep\n",
        "Paper (MNIST): with >= 300 units per layer all T > 8 gave similar results; with 30 units per layer "
        f"T in 2.5-4 was clearly best. Ours: Fashion-MNIST, {100 * budget.sweep_fraction:.0f}% of the training "
        f"split, {budget.sweep_epochs} epochs ({_fit_words(FM_FIT)}), hard-label weight 0.1, seed 0.\n",
        "| student | T | test errors | test acc (%) |",
        "|---|---:|---:|---:|",
        *[f"| {r['student']} | {r['T']:g} | {r['errors']} | {100 * r['acc']:.2f} |" for r in sweep],
        "",
    ]
    for label in dict.fromkeys(r["student"] for r in sweep):
        sub = [r for r in sweep if r["student"] == label]
        best = max(sub, key=lambda r: r["acc"])
        lines.append(f"- {label}: best T = {best['T']:g} ({100 * best['acc']:.2f}%).")
    big = [r for r in sweep if r["student"] == "MLP 800-800" and r["T"] > 8]
    tiny_best = max((r for r in sweep if r["student"] == "MLP 30-30"), key=lambda r: r["acc"])["T"]
    tiny = f"the tiny student's best T, {tiny_best:g}, {'agrees with' if 2.5 <= tiny_best <= 4 else 'differs from'} the paper's 2.5-4"
    if len(big) < 2:  # one temperature above 8 cannot show that they are similar
        large = "fewer than two temperatures above 8 were run for the large student"
    else:
        spread = max(r["acc"] for r in big) - min(r["acc"] for r in big)
        temps = ", ".join(f"{r['T']:g}" for r in big)
        large = (
            f"the large student's results at T = {temps} lie within {100 * spread:.2f} points of each other, "
            + ("similar, as in the paper" if spread <= 0.01 else "more than 1 point apart, unlike the paper")
        )
    lines.append(f"- {large}; {tiny}.")
    _plot_sweep(sweep, figures / "temperature_sweep.png")
    lines.append(f"\n![temperature sweep]({figures.name}/temperature_sweep.png)\n")
    report.add("\n".join(lines))
    report.seconds["temperature sweep"] = time.perf_counter() - t0

    # 3. omitted class
    t0 = time.perf_counter()
    om = omitted_class(
        fmnist,
        SoftTargets(fm_stage.checkpoint, stores / "fashion_mnist_omit3"),
        3,
        budget.omitted_epochs,
        budget,
        fm_kwargs,
        fit=FM_FIT,
    )
    (e0, c0, a0), (e1, c1, a1) = om["before"], om["after"]
    report.add(
        "\n".join(
            [
                "## 3. Omitted class\n",
                "Paper (MNIST, no 3s in the transfer set): 206 errors, 133 on 3s; class-3 bias +3.5 (tuned on the "
                "test set) gives 109 errors, 14 on 3s (98.6% of 3s correct). Ours: Fashion-MNIST, class 3 "
                f"(`{fmnist.class_names[3]}`) left out of the transfer set, MLP 800-800 distilled at T=20 for "
                f"{budget.omitted_epochs} epochs ({_fit_words(FM_FIT)}); the bias shift is chosen on the **validation** split only.\n",
                "| | bias shift | test errors | errors on class 3 | class 3 correct (%) |",
                "|---|---:|---:|---:|---:|",
                f"| before | 0 | {e0} | {c0} / {om['n_cls']} | {100 * a0:.1f} |",
                f"| after (validation-chosen) | {om['bias']:+.1f} | {e1} | {c1} / {om['n_cls']} | {100 * a1:.1f} |",
                "",
                f"- The student recognises {100 * a1:.1f}% of the never-seen class after the shift (paper 98.6%); "
                f"{'like the paper, a bias shift recovers most of the class' if a1 > 0.5 else 'unlike the paper, the shift recovers little of the class'}.",
                f"\n![bias]({figures.name}/omitted_class_bias.png)\n",
            ]
        )
    )
    _plot_bias(om, figures / "omitted_class_bias.png")
    report.seconds["omitted class"] = time.perf_counter() - t0

    # 4. soft targets as a regulariser
    t0 = time.perf_counter()
    reg = regulariser(
        fmnist,
        SoftTargets(fm_stage.checkpoint, stores / "fashion_mnist_3pct"),
        0.03,
        budget.regulariser_epochs,
        budget,
        fm_kwargs,
        fit=FM_FIT,
    )
    report.add(
        "\n".join(
            [
                "## 4. Soft targets as a regulariser (3% of the training data)\n",
                "Paper (speech, frame accuracy): 100% hard 58.9%; 3% hard 44.5% (early-stopped); 3% soft 57.0%. "
                f"Ours: MLP 800-800 on Fashion-MNIST; the 3% hard-target model is early-stopped on the validation "
                f"split (best of {budget.regulariser_epochs} epochs restored), the soft-target one is not; "
                f"the 100% baseline trains {reg['full_epochs']} epochs; all three {_fit_words(FM_FIT)}.\n",
                "| training data | targets | test acc (%) |",
                "|---|---|---:|",
                f"| 100% | hard | {100 * reg['hard_full']:.2f} |",
                f"| 3% | hard (early-stopped) | {100 * reg['hard_small']:.2f} |",
                f"| 3% | soft (T=20) | {100 * reg['soft_small']:.2f} |",
                "",
                _regulariser_sentence(reg),
            ]
        )
    )
    report.seconds["regulariser"] = time.perf_counter() - t0

    # 5. ensembles
    t0 = time.perf_counter()
    ens = ensembles(workdir, overrides)
    base = statistics.fmean(ens["members"])
    stud = statistics.fmean(ens["students"])
    share = (stud - base) / (ens["ensemble"] - base) if ens["ensemble"] != base else float("nan")
    report.add(
        "\n".join(
            [
                "## 5. Ensembles distilled into one model\n",
                "Paper (speech): baseline 58.9%, 10-model ensemble 61.1%, distilled single model 60.8% (over 80% of "
                "the gain kept). Ours: 4 MLP members of `member.yaml` and students of `distill_ensemble.yaml` "
                "(CNN members: docs/ensembles.md).\n",
                "| model | runs | test acc (%) |",
                "|---|---:|---:|",
                f"| member | {len(ens['members'])} | {mean_std(ens['members'], sample=False)} |",
                f"| ensemble (mean of probabilities) | 1 | {100 * ens['ensemble']:.2f} |",
                f"| distilled student | {len(ens['students'])} | {mean_std(ens['students'], sample=False)} |",
                "",
                f"- Share of the ensemble's gain kept: {100 * share:.0f}% (paper: over 80%).\n",
            ]
        )
    )
    report.seconds["ensembles"] = time.perf_counter() - t0

    # 6. specialists
    t0 = time.perf_counter()
    print(
        "specialists: scripts/benchmark_specialists.py's runs (Fashion-MNIST ones reused when finished) ..."
    )
    spec = specialists(workdir, args.quick, budget.fmnist_seeds)
    lines = [
        "## 6. Generalist and specialists\n",
        "Paper (JFT, 15,000 classes, 61 specialists): conditional test accuracy 43.1% -> 45.9%, test accuracy "
        "25.0% -> 26.1% (+4.4% relative); the gain grows with the number of specialists covering the true class "
        "(Table 4). Ours: `scripts/benchmark_specialists.py`'s experiments. Groups come from clustering the "
        "generalist's confusions; each specialist has a dustbin class and is combined with the generalist by "
        "KL minimisation. Conditional accuracy: on test inputs whose class a specialist covers, the prediction "
        "restricted to the specialists' classes.\n",
    ]
    for key, title, picture in (
        (
            "synthetic",
            "Synthetic: 50 classes in 10 planted groups, MLP 16 generalist and specialists",
            "specialists_synthetic.png",
        ),
        (
            "fashion_mnist",
            "Fashion-MNIST: the main job's CNN teacher as generalist",
            "specialists_fashion_mnist.png",
        ),
    ):
        lines += _specialist_lines(title, spec[key], f"{figures.name}/{picture}")
        _plot_specialists(spec[key], title, figures / picture)
    for key, name in (
        ("synthetic", "Synthetic (MLP 16)"),
        ("fashion_mnist", "Fashion-MNIST (CNN)"),
    ):
        lines.append(f"- {name}: {_specialist_verdict(spec[key])}")
    lines.append("")
    report.add("\n".join(lines))
    report.seconds["specialists"] = time.perf_counter() - t0

    timing = ["## Wall time\n", "| experiment | seconds |", "|---|---:|"]
    timing += [f"| {k} | {v:.0f} |" for k, v in report.seconds.items()]
    report.add("\n".join(timing) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report.sections))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
