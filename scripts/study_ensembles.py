"""Ensembles of small models against one larger model on Fashion-MNIST: accuracy against FLOPs and latency.

    python scripts/study_ensembles.py                   # CNNs (SmallCNN width sweep), 8 epochs; make study-ensembles
    python scripts/study_ensembles.py --family mlp      # MLPs (two hidden layers of width W), member.yaml's 10 epochs
    python scripts/study_ensembles.py --quick           # 1 epoch, tiny widths: checks the plumbing in a minute

``--family cnn`` (the default): single SmallCNNs with channels [W, 2W] (head 64) at widths W = 4, 8, 12,
16, and ensembles of 1 to 3 members of width 8 (2 and 3 x CNN-8 cost fewer FLOPs than CNN-12 and CNN-16),
all with cnn_member.yaml's recipe, ``--epochs`` epochs (Kondratyuk et al. 2020 compare such ensembles of
one convolutional family with its wider single networks at equal FLOPs). Width 8 is cnn_member.yaml's own
network: its members are the ones scripts/distill_ensemble.py trains at the same budget, reused. ``--family mlp``: single MLPs (two hidden layers of width W) and
ensembles of 1 to 4 members, member.yaml's recipe (10 epochs).
Members differ by seed only and are trained by :func:`kd_lightning.workflows.members.train_members`
(finished members are reused). Each ensemble size k is scored on every k-subset of the members (mean ±
std over subsets), combined by the mean of probabilities. FLOPs come from PyTorch's FLOP counter,
latency is the median time of one forward pass over a batch of 256 on this machine, measured in this run.

Prints the table, which ensembles beat a single larger model at equal or lower cost, the gain of each
added member, mean-of-probabilities against mean-of-logits, and writes
``runs/fashion_mnist/ensembles/<family>/accuracy_vs_cost.png`` (or ``--figure``) and ``study.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_lightning.costs import forward_flops, measure_latency
from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.ensemble import Ensemble, classification_metrics, combine_logits, predict_logits
from kd_lightning.modules import load_teacher
from kd_lightning.plots import pareto_front, plot_accuracy_vs_cost
from kd_lightning.workflows.members import train_members

ROOT = Path(__file__).resolve().parents[1]
NET = "model.init_args.net.init_args"


@dataclass(frozen=True)
class Family:
    """A network family swept by width: its member config, the config's own width, and the width override."""

    tag: str
    config: Path
    config_width: int
    key: str  # the init argument set to the width
    pattern: str  # its value for width W, formatted with w=W
    ensemble_widths: tuple[int, ...]
    single_widths: tuple[int, ...]
    members: int
    quick: tuple[tuple[int, ...], tuple[int, ...]]
    epochs: int | None = None  # default budget; None: the config's own
    shared: str | None = None  # where another script trains the config's own width at a budget {e}

    def name(self, width: int) -> str:
        return f"{self.tag}-{width}"

    def out(self, width: int, epochs: int | None) -> str:
        """The members' directory; the config's own width at a budget reuses ``shared`` when set."""
        if width == self.config_width and epochs is not None and self.shared is not None:
            return self.shared.format(e=epochs)
        if width == self.config_width:
            return f"runs/fashion_mnist/members/{self.config.stem}"
        return f"runs/fashion_mnist/members/{self.tag.lower()}{width}" + (f"_e{epochs}" if epochs else "")


FAMILIES = {
    "cnn": Family(
        "CNN",
        ROOT / "configs/fashion_mnist/cnn_member.yaml",
        8,
        "channels",
        "[{w},{w2}]",
        (8,),
        (4, 12, 16),
        3,
        ((2, 4), (6,)),
        epochs=8,
        shared="runs/fashion_mnist/ensemble_distillation/e{e}/members",
    ),
    "mlp": Family(
        "MLP",
        ROOT / "configs/fashion_mnist/member.yaml",
        512,
        "hidden",
        "[{w},{w}]",
        (128, 256, 512),
        (1024,),
        4,
        ((32, 64), (128,)),
    ),
}


def width_members(
    family: Family, width: int, n: int, workdir: str, overrides: list[str], epochs: int | None
) -> list[str]:
    """Train (or reuse) ``n`` seeds of the family's network of ``width``; their checkpoints."""
    extra = (
        []
        if width == family.config_width
        else [f"--{NET}.{family.key}={family.pattern.format(w=width, w2=2 * width)}"]
    )
    results = train_members(
        family.config,
        range(n),
        family.out(width, epochs),
        workdir,
        overrides=[*overrides, *extra],
        name=family.name(width),
    )
    return [r.checkpoint for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT), help="where runs/ is written (default: the repo)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cnn")
    parser.add_argument("--epochs", type=int, help="budget of every run (default: cnn 8, mlp the config's)")
    parser.add_argument("--ensemble-widths", type=int, nargs="+", help="default: the family's")
    parser.add_argument(
        "--single-widths", type=int, nargs="+", help="besides the above; default: the family's"
    )
    parser.add_argument("--members", type=int, help="members per ensemble width (default: cnn 3, mlp 4)")
    parser.add_argument("--quick", action="store_true", help="1 epoch, small widths (plumbing check)")
    parser.add_argument("--figure", help="where the plot goes (default: the study's directory)")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every member, after --")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    epochs = args.epochs if args.epochs is not None else family.epochs
    args.ensemble_widths = args.ensemble_widths or list(family.ensemble_widths)
    args.single_widths = args.single_widths or list(family.single_widths)
    args.members = args.members or family.members
    overrides = ["--trainer.enable_progress_bar=false", *args.overrides]
    if epochs is not None:
        overrides.append(f"--trainer.max_epochs={epochs}")
    if args.quick:
        args.ensemble_widths, args.single_widths, args.members = [*family.quick[0]], [*family.quick[1]], 3
        overrides += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=50"]
        epochs = None
    start = time.perf_counter()

    members: dict[int, list[str]] = {}
    for w in args.ensemble_widths:
        members[w] = width_members(family, w, args.members, args.workdir, overrides, epochs)
    for w in args.single_widths:
        members[w] = width_members(family, w, 1, args.workdir, overrides, epochs)
    train_seconds = time.perf_counter() - start

    dm = IndexedDataModule(FashionMNIST(), batch_size=1000, eval_batch_size=1000, val_size=5000)
    dm.setup("test")
    logits: dict[int, list[torch.Tensor]] = {}
    for w, ckpts in members.items():
        outs = [predict_logits(load_teacher(c), dm.test_dataloader()) for c in ckpts]
        logits[w] = [o[0] for o in outs]
        target = outs[0][1]

    points = []
    shape = FashionMNIST.input_shape
    for w, ckpts in members.items():
        nets = [load_teacher(c) for c in ckpts]
        params = sum(p.numel() for p in nets[0].parameters())
        for k in range(1, len(ckpts) + 1):
            scores = [
                classification_metrics(combine_logits(torch.stack([logits[w][i] for i in subset])), target)
                for subset in itertools.combinations(range(len(ckpts)), k)
            ]
            ensemble = Ensemble(members=nets[:k], input_shape=shape)
            acc = [s["acc"] for s in scores]
            points.append(
                {
                    "family": "single models" if k == 1 else f"{family.tag}-{w} ensembles",
                    "label": f"{w}" if k == 1 else f"{k}x{w}",
                    "width": w,
                    "members": k,
                    "subsets": len(scores),
                    "params": k * params,
                    "flops": forward_flops(ensemble, shape),
                    "latency_ms": 1000 * measure_latency(ensemble, shape, batch_size=256, repeats=30),
                    "acc": statistics.fmean(acc),
                    "acc_std": statistics.pstdev(acc),
                    "nll": statistics.fmean(s["nll"] for s in scores),
                    "ece": statistics.fmean(s["ece"] for s in scores),
                }
            )
    # The 1-member ensembles of a width are that width's single models: keep one series for them.
    for p in points:
        if p["members"] == 1 and p["width"] in args.ensemble_widths:
            p["family"] = "single models"
    report(points, logits, target, args.ensemble_widths, family.tag)

    out = Path(args.workdir) / "runs" / "fashion_mnist" / "ensembles" / args.family
    drawn = [{**p, "mflops": p["flops"] / 1e6} for p in points]
    # Each ensemble line starts at its width's single model (unlabelled: the single series labels it).
    drawn += [
        {**p, "family": f"{family.tag}-{p['width']} ensembles", "label": ""}
        for p in drawn
        if p["members"] == 1 and p["width"] in args.ensemble_widths
    ]
    png = plot_accuracy_vs_cost(
        drawn,
        Path(args.figure or out / "accuracy_vs_cost.png"),
        costs=(("mflops", "MFLOPs per example"), ("latency_ms", "latency per batch of 256 (ms)")),
        title=f"Fashion-MNIST: single {family.tag}s vs ensembles of smaller {family.tag}s (mean of probabilities)",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"points": points, "train_seconds": train_seconds}, indent=2))
    print(f"\nplot: {png}")
    print(f"wall time: {time.perf_counter() - start:.0f} s (training {train_seconds:.0f} s)")


def report(
    points: list[dict], logits: dict[int, list[torch.Tensor]], target: torch.Tensor, widths, tag: str
) -> None:
    print(
        "\nFashion-MNIST test set (10,000 images); k-member rows: mean ± std over every k-subset of the members\n"
    )
    print("| model | members | params | MFLOPs/example | ms / batch of 256 | test acc (%) | NLL | ECE (%) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in sorted(points, key=lambda p: (p["members"] > 1, p["width"], p["members"])):
        name = f"{tag}-{p['width']}" if p["members"] == 1 else f"{p['members']} x {tag}-{p['width']}"
        spread = f" ± {100 * p['acc_std']:.2f}" if p["subsets"] > 1 else " (1 run)"
        print(
            f"| {name} | {p['members']} | {p['params']:,} | {p['flops'] / 1e6:.2f} | {p['latency_ms']:.2f} | "
            f"{100 * p['acc']:.2f}{spread} | {p['nll']:.4f} | {100 * p['ece']:.2f} |"
        )

    singles = [p for p in points if p["members"] == 1]
    ensembles = [p for p in points if p["members"] > 1]
    for cost, unit in (("flops", "FLOPs"), ("latency_ms", "latency")):
        print(f"\nensembles more accurate than a single larger model at equal or lower {unit}:")
        wins = [
            (e, s)
            for e in ensembles
            for s in singles
            if s["width"] > e["width"] and e[cost] <= s[cost] and e["acc"] > s["acc"]
        ]
        for e, s in wins:
            print(
                f"  {e['members']} x {tag}-{e['width']} ({100 * e['acc']:.2f}%, {e[cost] / s[cost]:.2f}x the {unit}) "
                f"beats {tag}-{s['width']} ({100 * s['acc']:.2f}%)"
            )
        if not wins:
            print("  none")
        front = pareto_front([p[cost] for p in points], [p["acc"] for p in points])
        print(f"  Pareto front by {unit}: " + ", ".join(points[i]["label"] for i in front))

    print("\ngain of each added member (points of test accuracy), and the single next-wider model's gain:")
    by_width = {w: sorted((p for p in points if p["width"] == w), key=lambda p: p["members"]) for w in widths}
    for w, series in by_width.items():
        gains = [100 * (b["acc"] - a["acc"]) for a, b in itertools.pairwise(series)]
        wider = next((s for s in sorted(singles, key=lambda s: s["width"]) if s["width"] > w), None)
        wider_gain = (
            f"; {tag}-{wider['width']}: {100 * (wider['acc'] - series[0]['acc']):+.2f}" if wider else ""
        )
        print(
            f"  {tag}-{w}: "
            + ", ".join(f"member {k + 2}: {g:+.2f}" for k, g in enumerate(gains))
            + wider_gain
        )

    print("\ncombination rules, all members (mean of logits = renormalised geometric mean):")
    for w in widths:
        z = torch.stack(logits[w])
        row = {
            rule: classification_metrics(combine_logits(z, rule), target)
            for rule in ("mean_probs", "mean_logits")
        }
        print(
            f"  {len(logits[w])} x {tag}-{w}: "
            + ", ".join(f"{r} {100 * m['acc']:.2f}% NLL {m['nll']:.4f}" for r, m in row.items())
        )


if __name__ == "__main__":
    main()
