"""Specialists against one bigger model: is a generalist with specialists more accurate than a single wider
or deeper generalist of the same inference cost, in FLOPs and in measured latency?

The conditions are the capacity study's (:mod:`~kd_lightning.workflows.capacity_study`, shipped configs
``configs/synthetic/``): a generalist MLP with one hidden layer of 16 units on 100 confusable Gaussian
classes in 10 planted superclasses, overlapping groups found by clustering its validation predictions, and
the KL combination of the paper (top-1 activation). Per seed, in the capacity study's directories (finished
stages are reused, so a directory where ``scripts/benchmark_specialists.py --capacity-only`` ran already
holds the generalist, the same-size specialists and the 64-unit reference):

- **generalist alone**: ``seed<s>/`` (the capacity study's);
- **generalist + same-size specialists**: the generalist's network with a group head, started from the
  generalist's weights (``seed<s>/specialists/chosen``, the capacity study's);
- **generalist + smaller specialists**: an MLP of ``small_hidden`` units, its own architecture given by
  ``class_path`` overrides, started from scratch (the generalist's weights do not fit it)
  (``seed<s>/specialists/chosen-mlp<h>-scratch``);
- **single wider generalists** (one hidden layer of ``wider`` units) and **single deeper generalists**
  (``deeper``: several 16-unit layers), ``seed<s>/single/h<layers>``, plus the capacity study's 64-unit
  reference (``seed<s>/wide``).

**Same budget.** Every single model is the generalist's config with another ``hidden``: the same
recipe (AdamW, OneCycle, batch 128), the same 30 passes over the same training split and the same seed.
Every specialist gets the capacity study's budget (``DEFAULT_SETTING``: 40 epochs of 8,192 samples, half of
them its group's), whatever its size. The system therefore sees more training examples than a single model:
the report gives each row's *training examples seen* (optimizer steps x batch size, summed over the
system's networks) so that this is visible.

**Costs.** FLOPs per example by PyTorch's counter (:func:`~kd_lightning.costs.forward_flops`, matrix
products only). A system counts the generalist plus the specialists that *run*: as in the paper, a
specialist runs only on the inputs whose top-1 generalist class is in its group, so its FLOPs count with
its activation rate on the test split (``flops``); ``flops_all`` is the cost if every specialist ran.
The KL combination's own arithmetic is not in the FLOPs; it is in the latency. Latency is the median wall
time of one forward pass over the same 256 test inputs (:func:`~kd_lightning.costs.measure_latency`;
networks run one after another, as :meth:`~kd_lightning.specialists.SpecialistEnsemble.run_networks`
does), both for the whole prediction (networks + KL combination, ``latency_ms``) and for the networks alone
(``latency_networks_ms``).

:func:`specialist_cost` runs it and draws accuracy against FLOPs and latency; :func:`format_cost_report`
prints the table and :func:`verdict` says, from the numbers, whether each specialist system beats the
single models at equal FLOPs and at equal latency.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.costs import forward_flops, measure_latency
from kd_lightning.modules import load_teacher
from kd_lightning.specialists import SpecialistEnsemble
from kd_lightning.summary import mean_std
from kd_lightning.workflows.capacity_study import (
    DEFAULT_SETTING,
    GENERALIST_CONFIG,
    SPECIALIST_CONFIG,
    WIDE_HIDDEN,
    hidden_text,
    specialists_run,
    split_tensors,
    train_generalist,
)
from kd_lightning.workflows.specialists import specialist_config
from kd_lightning.workflows.stage import StageResult

WIDER: tuple[tuple[int, ...], ...] = ((18,), (24,))
"""Hidden layers of the single wider generalists (one layer): their FLOPs bracket the specialist systems'."""
DEEPER: tuple[tuple[int, ...], ...] = ((16, 16), (16, 16, 16, 16, 16))
"""Hidden layers of the single deeper generalists (16-unit layers): their FLOPs bracket the systems'."""
SMALL_HIDDEN: tuple[int, ...] = (8,)
"""Hidden units of the smaller specialists (one system per value), trained from scratch."""
LATENCY_BATCH = 256
"""Test inputs per timed forward pass."""
LATENCY_REPEATS = 30
"""Timed passes per model (the median is kept)."""
QUICK_OVERRIDES = [
    "--data.init_args.source.init_args.classes_per_superclass=3",
    "--data.init_args.source.init_args.train_per_class=40",
    "--data.init_args.source.init_args.test_per_class=10",
    "--data.init_args.val_size=300",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
]
"""``kd`` arguments of ``quick``: 30 classes, few samples, one short epoch per network."""
QUICK_GENERALIST = ["--trainer.callbacks.init_args.num_groups=4"]
"""``kd`` arguments of the generalist-type runs in ``quick``: 4 groups (its last callback clusters)."""
SPECIALIST_HIDDEN = "--model.init_args.net.init_args.hidden"
"""The ``kd`` argument of the specialists' (and single models') hidden layers."""


def _single_subdir(hidden: Sequence[int]) -> str:
    """Where a single model of ``hidden`` layers runs, under ``seed<s>/``.

    Example:
        >>> _single_subdir((16, 16))
        'single/h16-16'
    """
    return "single/h" + "-".join(str(int(h)) for h in hidden)


def small_name(hidden: int) -> str:
    """The directory, under ``seed<s>/specialists/``, of the smaller specialists of ``hidden`` units.

    Example:
        >>> small_name(8)
        'chosen-mlp8-scratch'
    """
    return f"chosen-mlp{int(hidden)}-scratch"


def examples_seen(checkpoint: str | Path, batch_size: int) -> int:
    """Training examples a run saw: its optimizer steps (the checkpoint's ``global_step``) x ``batch_size``."""
    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    return int(state["global_step"]) * int(batch_size)


def _batch_size(config: Path, overrides: Sequence[str]) -> int:
    return int(specialist_config(config, overrides).data.init_args.batch_size)


def single_row(
    name: str, kind: str, stage: StageResult, inputs: Tensor, repeats: int, batch_size: int
) -> dict[str, Any]:
    """Accuracy and costs of one single network (a generalist-type stage).

    Args:
        name: the row's label.
        kind: ``generalist``, ``wider``, ``deeper`` or ``reference``.
        stage: the trained stage.
        inputs: the batch latency is measured on.
        repeats: timed passes.
        batch_size: the training batch size (for the examples seen).
    """
    net = load_teacher(stage.checkpoint).net
    shape = tuple(inputs.shape[1:])
    flops = forward_flops(net, shape)
    latency = 1000 * measure_latency(net, shape, repeats=repeats, inputs=inputs)
    return {
        "name": name,
        "kind": kind,
        "acc": stage.test_acc,
        "params": stage.params,
        "flops": flops,
        "flops_all": flops,
        "latency_ms": latency,
        "latency_networks_ms": latency,
        "train_examples": examples_seen(stage.checkpoint, batch_size),
        "specialists_per_input": 0.0,
    }


class NetworksOnly(nn.Module):
    """A specialist system's networks without their combination, as a module: what timing them alone needs.

    Args:
        ensemble: a :class:`~kd_lightning.specialists.SpecialistEnsemble`.
    """

    def __init__(self, ensemble: SpecialistEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: Tensor) -> Any:
        return self.ensemble.run_networks(x)


def system_row(
    name: str, report: Mapping[str, Any], inputs: Tensor, repeats: int, batch_sizes: tuple[int, int]
) -> dict[str, Any]:
    """Accuracy and costs of a generalist + specialists system, from its test report and checkpoints.

    Args:
        name: the row's label.
        report: :func:`~kd_lightning.workflows.capacity_study.specialists_run`'s report (test split).
        inputs: the batch latency is measured on.
        repeats: timed passes.
        batch_sizes: the training batch sizes of the generalist and of the specialists.
    """
    ensemble = SpecialistEnsemble(
        report["generalist"], list(report["specialist_checkpoints"]), report["groups_file"]
    )
    shape = tuple(inputs.shape[1:])
    generalist_flops = report["flops_generalist"]
    seen = examples_seen(report["generalist"], batch_sizes[0]) + sum(
        examples_seen(c, batch_sizes[1]) for c in report["specialist_checkpoints"]
    )
    params = sum(p.numel() for p in ensemble.generalist.net.parameters()) + sum(
        p.numel() for s in ensemble.specialists for p in s.net.parameters()
    )
    return {
        "name": name,
        "kind": "system",
        "acc": report["acc"]["kl"],
        "params": params,
        "flops": generalist_flops * report["cost"],
        "flops_all": generalist_flops + sum(report["flops_specialists"]),
        "latency_ms": 1000 * measure_latency(ensemble, shape, repeats=repeats, inputs=inputs),
        "latency_networks_ms": 1000
        * measure_latency(NetworksOnly(ensemble), shape, repeats=repeats, inputs=inputs),
        "train_examples": seen,
        "specialists_per_input": report["specialists_per_input"],
        "specialists": len(report["specialist_checkpoints"]),
    }


def specialist_cost(
    seeds: Sequence[int] = (1, 2, 3),
    workdir: str | Path = "runs/benchmark_specialists/synthetic_capacity",
    small_hidden: Sequence[int] = SMALL_HIDDEN,
    wider: Sequence[Sequence[int]] = WIDER,
    deeper: Sequence[Sequence[int]] = DEEPER,
    reference: bool = True,
    figure: str | Path | None = None,
    latency_repeats: int = LATENCY_REPEATS,
    quick: bool = False,
    train_only: bool = False,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Generalist + specialists against single wider and deeper generalists at equal FLOPs and latency.

    Per seed: the generalist alone, with same-size specialists and with smaller ones, and the single
    wider and deeper generalists, each with its test accuracy, FLOPs per example and latency per batch;
    then the mean over seeds, the verdict, the figure and ``<workdir>/specialist_cost.json``.

    Args:
        seeds: one generalist, its specialists and the single models per seed.
        workdir: the capacity study's directory (finished stages there are reused); ``seed<s>/`` each.
        small_hidden: hidden units of the smaller specialists, one system per value (from scratch).
        wider: hidden layers of the single wider generalists (one layer each).
        deeper: hidden layers of the single deeper generalists.
        reference: also the capacity study's 64-unit generalist.
        figure: the accuracy-vs-cost PNG; default ``<workdir>/specialist_cost.png``.
        latency_repeats: timed passes per model (median kept).
        quick: a plumbing check of a few seconds per stage: tiny data (:data:`QUICK_OVERRIDES`), 4 groups,
            1-epoch specialists, one wider and one deeper model, no reference, 3 timed passes.
        train_only: train (or reuse) every stage and return ``{"seeds", "setting", "quick", "trained"}``
            without measuring: for training seeds in parallel processes, before one quiet call measures.
        overrides: ``kd`` arguments of every run.

    Returns:
        ``{"seeds", "setting", "runs": [{"seed", "rows": [...]}], "summary": [...], "verdict", "figure"}``:
        each row has ``name``, ``kind`` (``generalist``, ``system``, ``wider``, ``deeper``, ``reference``),
        ``acc``, ``params``, ``flops``, ``flops_all``, ``latency_ms``, ``latency_networks_ms``,
        ``train_examples`` and ``specialists_per_input``; ``summary`` has one row per model with the mean
        and std over seeds.

    Raises:
        ValueError: no seed, or a hidden size below 1.
    """
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one seed.")
    layers = [*(list(h) for h in wider), *(list(h) for h in deeper), [int(h) for h in small_hidden]]
    if any(not h or min(h) < 1 for h in layers):
        raise ValueError(
            f"hidden sizes must be >= 1: got wider {wider}, deeper {deeper}, small {small_hidden}."
        )
    workdir = Path(workdir)
    setting = dict(DEFAULT_SETTING)
    overrides = list(overrides)
    generalist_args: list[str] = []
    if quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
        generalist_args = list(QUICK_GENERALIST)
        setting["epochs"] = 1
        wider, deeper, reference, latency_repeats = list(wider)[:1], list(deeper)[:1], False, 3
    inputs = split_tensors("test", overrides)[0][:LATENCY_BATCH]
    batch_sizes = (
        _batch_size(GENERALIST_CONFIG, overrides),
        _batch_size(SPECIALIST_CONFIG, overrides),
    )
    single_args = [*overrides, *generalist_args]
    singles = [("wider", tuple(h)) for h in wider] + [("deeper", tuple(h)) for h in deeper]
    if reference:
        singles.append(("reference", (WIDE_HIDDEN,)))
    runs = []
    for seed in seeds:
        # Training first (every stage reused when finished), then the measurements, one model at a time.
        generalist = train_generalist(seed, workdir, single_args)
        same = specialists_run(seed, workdir, setting, "test", overrides, generalist_args=generalist_args)
        systems = [("+ same-size specialists (16, from the generalist)", same)]
        for h in small_hidden:
            extra = [f"{SPECIALIST_HIDDEN}=[{int(h)}]", "--model.init_args.init_from=scratch"]
            report = specialists_run(
                seed, workdir, setting, "test", overrides, small_name(h), extra, generalist_args
            )
            systems.append((f"+ smaller specialists ({int(h)}, from scratch)", report))
        stages = []
        for kind, hidden in singles:
            subdir = "wide" if kind == "reference" else _single_subdir(hidden)
            stage = train_generalist(seed, workdir, single_args, hidden, subdir)
            stages.append((f"{kind} generalist {hidden_text(hidden)}", kind, stage))
        if train_only:
            continue
        rows = [
            single_row(
                "generalist alone (16)", "generalist", generalist, inputs, latency_repeats, batch_sizes[0]
            )
        ]
        rows += [system_row(name, report, inputs, latency_repeats, batch_sizes) for name, report in systems]
        rows += [
            single_row(name, kind, stage, inputs, latency_repeats, batch_sizes[0])
            for name, kind, stage in stages
        ]
        runs.append({"seed": seed, "rows": rows})
    if train_only:
        return {"seeds": list(seeds), "setting": setting, "quick": quick, "trained": True}
    study: dict[str, Any] = {"seeds": list(seeds), "setting": setting, "quick": quick, "runs": runs}
    study["summary"] = summarise(runs)
    study["verdict"] = verdict(study["summary"])
    picture = Path(figure) if figure is not None else workdir / "specialist_cost.png"
    study["figure"] = str(plot_cost(study["summary"], picture, len(seeds)))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "specialist_cost.json").write_text(json.dumps(study, indent=2))
    return study


# --------------------------------------------------------------------------------------------------
# Summary over seeds, verdict, figure, report

COSTS = (
    ("flops", "FLOPs per example"),
    ("latency_ms", f"latency per batch of {LATENCY_BATCH}, prediction (ms)"),
    ("latency_networks_ms", f"latency per batch of {LATENCY_BATCH}, networks only (ms)"),
)
"""The costs compared: key and axis label."""
_NUMBERS = ("acc", "params", "flops", "flops_all", "latency_ms", "latency_networks_ms", "train_examples")


def summarise(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model over the seeds: the mean of every number, ``acc_std`` (sample std; 0 for one
    seed) and ``accs`` (per seed), in the first seed's order.

    Example:
        >>> runs = [{"rows": [{"name": "g", "kind": "generalist", "acc": a, "flops": 10}]} for a in (0.5, 0.7)]
        >>> row = summarise(runs)[0]
        >>> row["acc"], round(row["acc_std"], 4), row["flops"], row["seeds"]
        (0.6, 0.1414, 10.0, 2)
    """
    names = [r["name"] for r in runs[0]["rows"]]
    summary = []
    for name in names:
        mine = [r for run in runs for r in run["rows"] if r["name"] == name]
        row: dict[str, Any] = {"name": name, "kind": mine[0]["kind"], "seeds": len(mine)}
        for key in (*_NUMBERS, "specialists_per_input"):
            if key in mine[0]:
                row[key] = statistics.fmean(r[key] for r in mine)
        row["acc_std"] = statistics.stdev(r["acc"] for r in mine) if len(mine) > 1 else 0.0
        row["accs"] = [r["acc"] for r in mine]
        summary.append(row)
    return summary


def families(summary: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The single models as two series, each starting at the generalist alone: ``wider`` (one hidden layer,
    the 64-unit reference included) and ``deeper``; sorted by FLOPs."""
    base = [r for r in summary if r["kind"] == "generalist"]
    series = {
        "wider": base + [r for r in summary if r["kind"] in ("wider", "reference")],
        "deeper": base + [r for r in summary if r["kind"] == "deeper"],
    }
    return {k: sorted(v, key=lambda r: r["flops"]) for k, v in series.items()}


def at_equal_cost(cost: float, acc: float, series: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Compare a system with a series of single models at its cost ``key``.

    Inside the series' range, the single models' accuracy is interpolated linearly in log cost between the
    two nearest (``"interpolated"``); the system *wins* when it is more accurate. Above the range, every
    single model is cheaper: the system wins only if it beats the most accurate of them (``"above"``).
    Below the range, every single model costs more: the system wins if it is at least as accurate as the
    cheapest (``"below"``); otherwise nothing of equal cost was measured (``won`` is ``None``).

    Returns:
        ``{"where", "single_acc", "margin" (system - single, accuracy points as a fraction), "won",
        "between" (names of the models compared)}``.

    Example:
        >>> series = [{"name": "a", "flops": 10, "acc": 0.5}, {"name": "b", "flops": 1000, "acc": 0.8}]
        >>> r = at_equal_cost(100, 0.7, series, "flops")
        >>> r["where"], round(r["single_acc"], 4), r["won"]
        ('interpolated', 0.65, True)
        >>> at_equal_cost(5000, 0.7, series, "flops")["won"], at_equal_cost(1, 0.4, series, "flops")["won"]
        (False, None)
    """
    points = sorted(series, key=lambda r: r[key])
    lo, hi = points[0], points[-1]
    if cost > hi[key]:
        best = max(points, key=lambda r: r["acc"])
        return {
            "where": "above",
            "single_acc": best["acc"],
            "margin": acc - best["acc"],
            "won": acc > best["acc"],
            "between": [best["name"]],
        }
    if cost < lo[key]:
        won = True if acc >= lo["acc"] else None
        return {
            "where": "below",
            "single_acc": lo["acc"],
            "margin": acc - lo["acc"],
            "won": won,
            "between": [lo["name"]],
        }
    right = next(i for i, r in enumerate(points) if r[key] >= cost)
    a, b = points[max(right - 1, 0)], points[right]
    if b[key] == a[key]:
        single = b["acc"]
    else:
        t = (math.log(cost) - math.log(a[key])) / (math.log(b[key]) - math.log(a[key]))
        single = a["acc"] + t * (b["acc"] - a["acc"])
    return {
        "where": "interpolated",
        "single_acc": single,
        "margin": acc - single,
        "won": acc > single,
        "between": [a["name"], b["name"]],
    }


def verdict(summary: Sequence[Mapping[str, Any]]) -> str:
    """Per specialist system and cost (FLOPs, latency of the prediction): does it beat the single wider and
    deeper generalists of equal cost (:func:`at_equal_cost`)? Computed from the seeds' mean accuracies;
    a margin smaller than the larger seed std of the two sides is called within noise."""
    lines = ["Verdict (from the mean test accuracies over seeds):"]
    series = families(summary)
    spread = max((r["acc_std"] for r in summary), default=0.0)
    for system in (r for r in summary if r["kind"] == "system"):
        for key, label in (("flops", "FLOPs"), ("latency_ms", "latency")):
            parts = []
            for family, points in series.items():
                r = at_equal_cost(system[key], system["acc"], points, key)
                margin = 100 * r["margin"]
                noise = " (within the seeds' spread)" if abs(r["margin"]) < spread else ""
                if r["where"] == "interpolated":
                    text = (
                        f"the {family} single model of equal {label} (interpolated between "
                        f"{' and '.join(r['between'])}) scores {100 * r['single_acc']:.2f}%: "
                        f"{margin:+.2f} points{noise}, {'wins' if r['won'] else 'loses'}"
                    )
                elif r["where"] == "above":
                    text = (
                        f"every {family} single model is cheaper; the best, {r['between'][0]}, scores "
                        f"{100 * r['single_acc']:.2f}%: {margin:+.2f} points{noise}, "
                        f"{'wins (more accurate than any cheaper single model)' if r['won'] else 'loses (a cheaper single model is at least as accurate)'}"
                    )
                else:
                    text = (
                        f"every {family} single model costs more; the cheapest, {r['between'][0]}, scores "
                        f"{100 * r['single_acc']:.2f}%: {margin:+.2f} points, "
                        + (
                            "wins (cheaper and at least as accurate)"
                            if r["won"]
                            else "no single model of equal cost was measured"
                        )
                    )
                parts.append(text)
            lines.append(
                f"- {system['name']}, {100 * system['acc']:.2f}% at {system[key]:,.4g} "
                f"{'FLOPs' if key == 'flops' else 'ms'}: " + "; ".join(parts) + "."
            )
    return "\n".join(lines)


def plot_cost(summary: Sequence[Mapping[str, Any]], path: str | Path, seeds: int) -> Path:
    """Accuracy against FLOPs, latency of the prediction and latency of the networks alone (PNG at
    ``path``): the wider and deeper single generalists as two series, each specialist system a point."""
    from kd_lightning.plots import plot_accuracy_vs_cost

    points = []
    names = {"wider": "wider generalist (1 hidden layer)", "deeper": "deeper generalist (16-unit layers)"}
    for family, series in families(summary).items():
        for r in series:
            label = r["name"].split(" ")[-1] if r["kind"] != "generalist" else "16"
            points.append({**r, "family": names[family], "label": label})
    for r in summary:
        if r["kind"] == "system":
            points.append({**r, "family": r["name"], "label": ""})
    return plot_accuracy_vs_cost(
        points,
        path,
        costs=COSTS,
        title=f"synthetic, 100 classes: generalist + specialists vs single models ({seeds} seed"
        f"{'s' if seeds > 1 else ''}; mean ± std)",
    )


def format_cost_report(study: Mapping[str, Any]) -> str:
    """:func:`specialist_cost`'s result as markdown: one row per model (mean ± std over seeds), the
    per-seed accuracies, whether the single models' FLOPs bracket each system's, and the verdict."""
    summary = study["summary"]
    s = study["setting"]
    lines = [
        f"seeds {study['seeds']}; specialists: overlap {s['overlap']} (threshold {s['overlap_threshold']}), "
        f"{s['epochs']} epochs, soft weight {s['soft_weight']}; single models: the generalist's recipe and "
        "epochs; latency: median of timed passes over the same test batch, networks one after another",
        "",
        "| model | test acc (%) | per seed (%) | parameters | FLOPs / example | FLOPs if all specialists ran "
        "| specialists / input | latency, prediction (ms) | latency, networks (ms) | training examples seen |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        per_seed = " / ".join(f"{100 * a:.2f}" for a in r["accs"])
        acc = mean_std(r["accs"]) if len(r["accs"]) > 1 else f"{100 * r['acc']:.2f}"
        lines.append(
            f"| {r['name']} | {acc} | {per_seed} | {r['params']:,.0f} | {r['flops']:,.0f} | {r['flops_all']:,.0f} "
            f"| {r.get('specialists_per_input', 0.0):.2f} | {r['latency_ms']:.3f} | {r['latency_networks_ms']:.3f} "
            f"| {r['train_examples']:,.0f} |"
        )
    lines.append("")
    series = families(summary)
    for system in (r for r in summary if r["kind"] == "system"):
        bracket = []
        for family, points in series.items():
            costs = [p["flops"] for p in points]
            inside = min(costs) <= system["flops"] <= max(costs)
            bracket.append(f"{family} {'yes' if inside else 'no'} ({min(costs):,.0f} to {max(costs):,.0f})")
        lines.append(f"FLOPs of {system['name']} bracketed by the single models: " + ", ".join(bracket))
    lines += ["", study["verdict"]]
    return "\n".join(lines)
