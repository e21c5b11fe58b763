"""Specialists against one bigger model (kd_lightning.workflows.specialist_cost): the comparison at equal
cost, the summary over seeds, the verdict and the report on hand-made numbers, and the whole study in its
quick mode through the shipped configs with real Trainers (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from kd_lightning.costs import measure_latency
from kd_lightning.specialists import load_specialist
from kd_lightning.workflows import parser_for
from kd_lightning.workflows import specialist_cost as sc


def row(name: str, kind: str, acc: float, flops: float, latency: float, **extra) -> dict:
    return {
        "name": name,
        "kind": kind,
        "acc": acc,
        "params": 100,
        "flops": flops,
        "flops_all": flops,
        "latency_ms": latency,
        "latency_networks_ms": latency,
        "train_examples": 10,
        "specialists_per_input": 0.0,
        **extra,
    }


def runs() -> list[dict]:
    """Two seeds: a generalist (0.60/0.62), a system of 1.4x its FLOPs and 20x its latency (0.70/0.74),
    wider models of 1.2x and 2x its FLOPs, one deeper model of 1.1x."""
    out = []
    for seed, shift in ((1, 0.0), (2, 0.02)):
        out.append(
            {
                "seed": seed,
                "rows": [
                    row("generalist", "generalist", 0.60 + shift, 1000, 1.0),
                    row("system", "system", 0.70 + 2 * shift, 1400, 20.0, specialists_per_input=1.2),
                    row("wide 1.2x", "wider", 0.64 + shift, 1200, 1.1),
                    row("wide 2x", "wider", 0.80 + shift, 2000, 1.5),
                    row("deep 1.1x", "deeper", 0.61 + shift, 1100, 1.2),
                ],
            }
        )
    return out


def test_summary_over_seeds_keeps_order_means_and_spread():
    summary = sc.summarise(runs())
    assert [r["name"] for r in summary] == ["generalist", "system", "wide 1.2x", "wide 2x", "deep 1.1x"]
    system = summary[1]
    assert system["acc"] == pytest.approx(0.72) and system["accs"] == [0.70, 0.74]
    assert system["acc_std"] == pytest.approx(0.04 / 2**0.5)  # sample std of two values
    assert system["specialists_per_input"] == pytest.approx(1.2) and system["seeds"] == 2
    series = sc.families(summary)
    assert [r["name"] for r in series["wider"]] == ["generalist", "wide 1.2x", "wide 2x"]
    assert [r["name"] for r in series["deeper"]] == ["generalist", "deep 1.1x"]


def test_equal_cost_interpolates_in_log_cost_and_handles_both_ends():
    series = [{"name": "a", "flops": 1000, "acc": 0.6}, {"name": "b", "flops": 4000, "acc": 0.8}]
    # 2000 is half way between 1000 and 4000 in log cost.
    r = sc.at_equal_cost(2000, 0.75, series, "flops")
    assert r["where"] == "interpolated" and r["between"] == ["a", "b"]
    assert r["single_acc"] == pytest.approx(0.7) and r["margin"] == pytest.approx(0.05) and r["won"]
    assert sc.at_equal_cost(1000, 0.6, series, "flops")["won"] is False  # equal accuracy: not a win
    above = sc.at_equal_cost(9000, 0.79, series, "flops")
    assert above["where"] == "above" and above["between"] == ["b"] and above["won"] is False
    below = sc.at_equal_cost(500, 0.65, series, "flops")
    assert below["where"] == "below" and below["won"] is True
    assert sc.at_equal_cost(500, 0.5, series, "flops")["won"] is None  # nothing as cheap was measured


def test_verdict_and_report_come_from_the_numbers(tmp_path):
    summary = sc.summarise(runs())
    text = sc.verdict(summary)
    # FLOPs: the system (1400) sits between wide 1.2x (1200) and wide 2x (2000), and above every deeper one.
    assert "system, 72.00% at 1,400 FLOPs" in text
    assert "interpolated between wide 1.2x and wide 2x" in text
    assert (
        "every deeper single model is cheaper; the best, deep 1.1x, scores 62.00%: +10.00 points, wins"
        in text
    )
    # Latency: 20 ms is above every single model; the 2x wider one is cheaper and more accurate.
    assert (
        "every wider single model is cheaper; the best, wide 2x, scores 81.00%: -9.00 points, loses" in text
    )
    study = {"seeds": [1, 2], "setting": dict(sc.DEFAULT_SETTING), "summary": summary, "verdict": text}
    report = sc.format_cost_report(study)
    assert "| system | 72.00 ± 2.83 | 70.00 / 74.00 |" in report
    assert "bracketed by the single models: wider yes (1,000 to 2,000), deeper no (1,000 to 1,100)" in report
    picture = sc.plot_cost(summary, tmp_path / "cost.png", 2)
    assert picture.is_file() and picture.stat().st_size > 10_000


def test_latency_on_given_inputs_and_its_errors():
    net = torch.nn.Linear(4, 2)
    assert measure_latency(net, (4,), repeats=2, inputs=torch.randn(3, 4)) > 0
    with pytest.raises(
        ValueError, match=r"`inputs` must be a batch of inputs of shape \(4,\), got shape \(3, 5\)"
    ):
        measure_latency(net, (4,), inputs=torch.randn(3, 5))


def test_kd_specialist_cost_is_a_workflow_with_typed_arguments():
    config = parser_for("specialist-cost").parse_args(
        ["--seeds=[1]", "--quick=true", "--wider=[[20], [24]]", "--deeper=[[16, 16]]", "--small_hidden=[4]"]
    )
    assert (
        config.seeds == [1] and config.quick and config.wider == [[20], [24]] and config.small_hidden == [4]
    )
    with pytest.raises(ValueError, match="`seeds` is empty"):
        sc.specialist_cost([], "unused")
    with pytest.raises(ValueError, match="hidden sizes must be >= 1"):
        sc.specialist_cost([1], "unused", small_hidden=[0])


@pytest.mark.slow
def test_quick_study_runs_the_shipped_configs_end_to_end(tmp_path):
    """Every row trains through the product's stages, the smaller specialists from scratch with their own
    network; the costs order as they must; a second call reuses every stage and only measures."""
    study = sc.specialist_cost([1], tmp_path, quick=True, figure=tmp_path / "cost.png")
    rows = {r["kind"] + ":" + r["name"]: r for r in study["runs"][0]["rows"]}
    kinds = [r["kind"] for r in study["runs"][0]["rows"]]
    assert kinds == ["generalist", "system", "system", "wider", "deeper"]
    generalist = next(r for r in rows.values() if r["kind"] == "generalist")
    same, small = (r for r in rows.values() if r["kind"] == "system")
    # A system runs the generalist and some specialists: more FLOPs than the generalist, at most all of them.
    assert generalist["flops"] < small["flops"] < same["flops"] <= same["flops_all"]
    assert small["flops"] <= small["flops_all"] < same["flops_all"]
    assert same["train_examples"] > generalist["train_examples"] > 0
    assert same["latency_ms"] > 0 and same["latency_networks_ms"] > 0
    assert 0 < same["specialists_per_input"] <= same["specialists"]
    # The smaller specialists: their own 8-unit network, trained from scratch, reloadable alone.
    out = tmp_path / "seed1" / "specialists" / sc.small_name(8)
    specialist = load_specialist(out / "group0.ckpt")
    assert specialist.net.net[1].out_features == 8 and specialist.hparams["init_from"] == "scratch"
    same_dir = tmp_path / "seed1" / "specialists" / "chosen"
    assert load_specialist(same_dir / "group0.ckpt").net.net[1].out_features == 16
    assert (tmp_path / "cost.png").is_file() and "Verdict" in study["verdict"]
    saved = json.loads((tmp_path / "specialist_cost.json").read_text())
    assert saved["summary"] == study["summary"]
    # Reused: the same accuracies without training again (the stage records say so).
    again = sc.specialist_cost([1], tmp_path, quick=True, figure=tmp_path / "cost.png")
    assert [r["acc"] for r in again["runs"][0]["rows"]] == [r["acc"] for r in study["runs"][0]["rows"]]
    record = json.loads((out / "group0.json").read_text())
    assert "--model.init_args.init_from=scratch" in record["command"]
