"""Ensembles of small models against one larger model on Fashion-MNIST: accuracy against FLOPs and latency.

    python scripts/study_ensembles.py            # or: make study-ensembles
    python scripts/study_ensembles.py --quick    # 1 epoch, tiny widths: checks the plumbing in a minute

Single MLPs (two hidden layers of width W) at several widths, and ensembles of 1 to 4 members at the
smaller widths, all with member.yaml's recipe (10 epochs). Members differ by seed only and are trained
by :func:`kd_lightning.workflows.members.train_members` (finished members are reused, also by
scripts/distill_ensemble.py). Each ensemble size k is scored on every k-subset of the 4 members (mean ±
std over subsets), combined by the mean of probabilities. FLOPs come from PyTorch's FLOP counter,
latency is the median time of one forward pass over a batch of 256 on this machine, measured in this run.

Prints the table, which ensembles beat a single larger model at equal or lower cost, the gain of each
added member, mean-of-probabilities against mean-of-logits, and writes
``runs/fashion_mnist/ensembles/accuracy_vs_cost.png`` (and ``study.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from kd_lightning.costs import forward_flops, measure_latency
from kd_lightning.datamodules import FashionMNIST, IndexedDataModule
from kd_lightning.ensemble import Ensemble, classification_metrics, combine_logits, predict_logits
from kd_lightning.modules import load_teacher
from kd_lightning.plots import pareto_front, plot_accuracy_vs_cost
from kd_lightning.workflows.members import train_members

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist" / "member.yaml"
CONFIG_WIDTH = 512  # member.yaml's own width: its members are the ones scripts/distill_ensemble.py uses
HIDDEN = "model.init_args.net.init_args.hidden"


def width_members(width: int, n: int, workdir: str, overrides: list[str]) -> list[str]:
    """Train (or reuse) ``n`` seeds of the MLP of ``width``; their checkpoints."""
    if width == CONFIG_WIDTH:
        out, extra = "runs/fashion_mnist/members/member", []
    else:
        out, extra = f"runs/fashion_mnist/members/mlp{width}", [f"--{HIDDEN}=[{width},{width}]"]
    results = train_members(
        CONFIG, range(n), out, workdir, overrides=[*overrides, *extra], name=f"MLP-{width}"
    )
    return [r.checkpoint for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT), help="where runs/ is written (default: the repo)")
    parser.add_argument("--ensemble-widths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--single-widths", type=int, nargs="+", default=[1024], help="besides the above")
    parser.add_argument("--members", type=int, default=4, help="members per ensemble width")
    parser.add_argument("--quick", action="store_true", help="1 epoch, small widths (plumbing check)")
    parser.add_argument("overrides", nargs="*", help="kd arguments for every member, after --")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.quick:
        args.ensemble_widths, args.single_widths, args.members = [32, 64], [128], 3
        overrides += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=50"]
    start = time.perf_counter()

    members: dict[int, list[str]] = {}
    for w in args.ensemble_widths:
        members[w] = width_members(w, args.members, args.workdir, overrides)
    for w in args.single_widths:
        members[w] = width_members(w, 1, args.workdir, overrides)
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
                    "family": "single models" if k == 1 else f"MLP-{w} ensembles",
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
    report(points, logits, target, args.ensemble_widths)

    out = Path(args.workdir) / "runs" / "fashion_mnist" / "ensembles"
    drawn = [{**p, "mflops": p["flops"] / 1e6} for p in points]
    # Each ensemble line starts at its width's single model (unlabelled: the single series labels it).
    drawn += [
        {**p, "family": f"MLP-{p['width']} ensembles", "label": ""}
        for p in drawn
        if p["members"] == 1 and p["width"] in args.ensemble_widths
    ]
    png = plot_accuracy_vs_cost(
        drawn,
        out / "accuracy_vs_cost.png",
        costs=(("mflops", "MFLOPs per example"), ("latency_ms", "latency per batch of 256 (ms)")),
        title="Fashion-MNIST: single MLPs vs ensembles of smaller MLPs (mean of probabilities)",
    )
    (out / "study.json").write_text(json.dumps({"points": points, "train_seconds": train_seconds}, indent=2))
    print(f"\nplot: {png}")
    print(f"wall time: {time.perf_counter() - start:.0f} s (training {train_seconds:.0f} s)")


def report(points: list[dict], logits: dict[int, list[torch.Tensor]], target: torch.Tensor, widths) -> None:
    print(
        "\nFashion-MNIST test set (10,000 images); k-member rows: mean ± std over every k-subset of the members\n"
    )
    print("| model | members | params | MFLOPs/example | ms / batch of 256 | test acc (%) | NLL | ECE (%) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in sorted(points, key=lambda p: (p["members"] > 1, p["width"], p["members"])):
        name = f"MLP-{p['width']}" if p["members"] == 1 else f"{p['members']} x MLP-{p['width']}"
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
                f"  {e['members']} x MLP-{e['width']} ({100 * e['acc']:.2f}%, {e[cost] / s[cost]:.2f}x the {unit}) "
                f"beats MLP-{s['width']} ({100 * s['acc']:.2f}%)"
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
            f"; MLP-{wider['width']}: {100 * (wider['acc'] - series[0]['acc']):+.2f}" if wider else ""
        )
        print(
            f"  MLP-{w}: " + ", ".join(f"member {k + 2}: {g:+.2f}" for k, g in enumerate(gains)) + wider_gain
        )

    print("\ncombination rules, all members (mean of logits = renormalised geometric mean):")
    for w in widths:
        z = torch.stack(logits[w])
        row = {
            rule: classification_metrics(combine_logits(z, rule), target)
            for rule in ("mean_probs", "mean_logits")
        }
        print(
            f"  {len(logits[w])} x MLP-{w}: "
            + ", ".join(f"{r} {100 * m['acc']:.2f}% NLL {m['nll']:.4f}" for r, m in row.items())
        )


if __name__ == "__main__":
    main()
