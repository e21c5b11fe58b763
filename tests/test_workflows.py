"""The library's workflows: the ``kd <workflow>`` dispatch, the stage record, ``kd summary``, the
specialists workflow, and scripts that only orchestrate (no ``sys.path`` edits, no script imports)."""

from __future__ import annotations

import ast
import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
from test_run_dir import tiny_config
from trainers import quiet_trainer

from kd_lightning.cli import console, main
from kd_lightning.clustering import ClassGroups
from kd_lightning.datamodules import IndexedDataModule, Synthetic
from kd_lightning.models import MLP
from kd_lightning.modules import ClassifierModule
from kd_lightning.summary import summarize
from kd_lightning.workflows import WORKFLOWS, resolve
from kd_lightning.workflows.selection import best_candidate, choose_on_validation
from kd_lightning.workflows.specialists import count_specialists, format_report, train_specialists
from kd_lightning.workflows.stage import StageResult, run_stage, working_directory

ROOT = Path(__file__).resolve().parents[1]
# Every workflow but fill-store, whose module is written apart: the dispatch must not need it to exist.
CORE = ("stage", "members", "specialists", "summary")


def run_kd(capsys, *argv: str) -> tuple[int | str | None, str, str]:
    """``kd ARGV`` in-process: its exit code (``None``: returned normally), stdout and stderr."""
    code = None
    try:
        console(list(argv))
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------ dispatch


def test_registry_names_module_functions():
    assert set(CORE) | {
        "fill-store",
        "choose",
        "ensemble-kd",
        "specialists-kd",
        "feature-kd",
        "specialist-cost",
    } == set(WORKFLOWS)
    assert all(entry.count(":") == 1 and entry.startswith("kd_lightning.") for entry in WORKFLOWS.values())
    for name in CORE:
        function = resolve(name)
        assert callable(function) and "Args:" in function.__doc__ and "Returns:" in function.__doc__
    with pytest.raises(KeyError, match="no workflow 'nope'; available: stage, members"):
        resolve("nope")


@pytest.mark.parametrize("argv", [["--help"], []], ids=["help", "no arguments"])
def test_kd_help_lists_lightning_subcommands_and_workflows(capsys, argv):
    code, out, _ = run_kd(capsys, *argv)
    assert code == (0 if argv else 2)
    for sub in ("fit", "validate", "test", "predict", *WORKFLOWS):
        assert sub in out
    listing = out[out.index("workflows (kd <workflow> --help") :]
    width = max(len(name) for name in WORKFLOWS)  # names padded to the longest
    assert f"  {'members':<{width}}  Train ensemble members of one config" in listing


def test_kd_stage_help_lists_the_documented_arguments(capsys):
    code, out, _ = run_kd(capsys, "stage", "--help")
    assert code == 0 and out.startswith("usage: kd stage")
    assert "Fit and test the model of ``config``" in out
    for argument, described in [
        ("--name", "label of the stage in tables"),
        ("--config", "a ``kd`` YAML config"),
        ("--overrides", "extra ``kd`` arguments"),
        ("--force", "refit from scratch"),
    ]:
        assert argument in out and described in out
    assert "Arguments after `--` are kd arguments" in out


def test_kd_members_help_lists_the_documented_arguments(capsys):
    code, out, _ = run_kd(capsys, "members", "--help")
    assert code == 0 and out.startswith("usage: kd members")
    for argument, described in [
        ("--members", "which members to train"),
        ("--out", "directory of the members"),
        ("--seed_base", "is seeded ``seed_base + k``"),
        ("--vary", "also gets"),
    ]:
        assert argument in out and described in out


def test_unknown_subcommand_is_an_error_listing_the_available_ones(capsys):
    code, out, err = run_kd(capsys, "sfit", "--config", "x.yaml")
    assert code == 2 and not out
    assert "unknown subcommand 'sfit'" in err
    assert all(name in err for name in ("fit", "validate", "test", "predict", *CORE))


def test_kd_stage_runs_a_config_and_reuses_it(tmp_path, capsys):
    config = tiny_config(tmp_path)
    argv = ["stage", "--name", "tiny", "--config", str(config), "--workdir", str(tmp_path)]
    code, out, _ = run_kd(capsys, *argv, "--", "--trainer.max_epochs=1")
    assert code is None
    first = json.loads(out[out.index("{") :])
    assert (
        first["name"] == "tiny"
        and not first["reused"]
        and first["command"].endswith("--trainer.max_epochs=1")
    )
    assert Path(first["checkpoint"]) == tmp_path / "runs/a/seed5/checkpoints/final.ckpt"
    # The record keeps the last validation epoch's metrics, those of the saved model: what choices between
    # stages are made on (test metrics are for reporting only).
    with working_directory(tmp_path):
        validated = main(["validate", "--config", str(config), "--ckpt_path", first["checkpoint"]])
    assert first["metrics"]["val/acc"] == float(validated.trainer.callback_metrics["val/acc"])
    assert {"val/loss", "test/acc", "test/loss"} <= first["metrics"].keys()
    # The same command from Python is the same stage: reused.
    again = run_stage("tiny", config, tmp_path, ["--trainer.max_epochs=1"])
    assert again.reused and again.checkpoint == first["checkpoint"] and again.test_acc == first["test_acc"]


def test_a_stage_resumed_from_a_finished_run_still_records_its_validation(tmp_path):
    """A new command on a run directory whose last.ckpt already reached the budget (e.g. an argument
    spelled out that equals the config's default): fit runs no epoch, yet the record has val/ metrics."""
    config = tiny_config(tmp_path)
    first = run_stage("tiny", config, tmp_path, ["--trainer.max_epochs=1"])
    again = run_stage("tiny", config, tmp_path, ["--trainer.max_epochs=1", "--seed_everything=5"])
    assert not again.reused and again.checkpoint == first.checkpoint
    assert again.metrics["val/acc"] == pytest.approx(first.metrics["val/acc"])


# ------------------------------------------------------------------------------------------ records


def test_an_ordinary_stage_record_has_exactly_the_result_fields():
    result = StageResult("a", "kd fit --config a.yaml", "/a.ckpt", 0.5, 10, 1.0, {"test/acc": 0.5})
    assert list(result.record()) == [
        "name", "command", "checkpoint", "test_acc", "params", "fit_seconds", "metrics", "reused",
    ]  # fmt: skip
    assert StageResult.from_record(json.loads(json.dumps(result.record()))) == result


def test_summary_of_finished_stages(tmp_path, capsys):
    for seed, acc in [(1, 0.90), (2, 0.92)]:
        record = tmp_path / f"seed{seed}" / "checkpoints" / "result.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"metrics": {"test/acc": acc, "test/loss": 0.3}}))
    summary = summarize([tmp_path])
    assert summary["values"] == [0.90, 0.92] and summary["mean_std"] == "91.00 ± 1.41"
    assert len(summary["runs"]) == 2
    code, out, _ = run_kd(
        capsys, "summary", "--results", json.dumps([str(tmp_path / "seed1")]), "--metric", "test/loss"
    )
    assert code is None and '"mean_std": "30.00 ± 0.00"' in out
    with pytest.raises(KeyError, match="`metric` 'test/nll': not recorded in .*it has \\['test/acc'"):
        summarize([tmp_path], metric="test/nll")
    with pytest.raises(FileNotFoundError, match="`results`: no file or directory at"):
        summarize([tmp_path / "missing"])


# ------------------------------------------------------------------------------------------ specialists

NET = partial(MLP, hidden=(16,))

CONFIG = """
seed_everything: 1
trainer:
  max_steps: 3
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 1
model:
  class_path: kd_lightning.specialists.SpecialistModule
  init_args:
    net: {class_path: kd_lightning.models.MLP, init_args: {hidden: [16]}}
    generalist_ckpt: generalist.ckpt
data:
  class_path: kd_lightning.datamodules.specialist.SpecialistDataModule
  init_args:
    source:
      class_path: kd_lightning.datamodules.Synthetic
      init_args: {num_superclasses: 3, classes_per_superclass: 2, dim: 8, train_per_class: 40, test_per_class: 10}
    groups_file: groups.json
    batch_size: 32
    eval_batch_size: 64
    val_size: 40
"""


@pytest.fixture
def generalist(tmp_path):
    """A generalist on 6 Synthetic classes and a groups file {0,1}, {2,3} in ``tmp_path``."""
    L.seed_everything(0)
    source = Synthetic(
        num_superclasses=3, classes_per_superclass=2, dim=8, train_per_class=40, test_per_class=10
    )
    model = ClassifierModule(NET, 6, (8,))
    trainer = quiet_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, IndexedDataModule(source, batch_size=32, eval_batch_size=64, val_size=40))
    trainer.save_checkpoint(tmp_path / "generalist.ckpt")
    ClassGroups(6, source.class_names, [[0, 1], [2, 3]]).save(tmp_path / "groups.json")
    (tmp_path / "specialist.yaml").write_text(CONFIG)
    return tmp_path


def test_train_specialists_workflow(generalist, capsys):
    d = generalist
    config, out = d / "specialist.yaml", d / "out"
    assert count_specialists(config, workdir=d) == 2
    one = train_specialists(config, group=1, out=out, workdir=d)  # what one SLURM array task runs
    assert [r.details["group"] for r in one["specialists"]] == [1] and (out / "group1.ckpt").is_file()
    # The record beside the checkpoint keeps the specialist's keys at the top level.
    record = json.loads((out / "group1.json").read_text())
    assert record["group"] == 1 and record["classes"] == [2, 3] and "dustbin_correction" in record
    assert (
        record["command"].endswith("--data.init_args.group=1") and "default_root_dir" not in record["command"]
    )
    everything = train_specialists(config, out=out, workdir=d, evaluate=True)  # group 1 reused, 0 trained
    assert [r.reused for r in everything["specialists"]] == [False, True]
    report = json.loads((out / "report.json").read_text())
    assert set(report["acc"]) == {"generalist", "kl", "average"} and report["groups"] == [[0, 1], [2, 3]]
    assert report == json.loads(json.dumps(everything["report"])) and Path(everything["picture"]).is_file()
    assert "| generalist + specialists (KL) |" in format_report(everything["report"])
    with pytest.raises(ValueError, match=r"`group` must be in \[0, 2\)"):
        train_specialists(config, group=5, out=out, workdir=d)
    # A record written before specialists were stages (no name, test_acc, params) is still reused.
    legacy = {k: v for k, v in record.items() if k not in ("name", "test_acc", "params")}
    (out / "group1.json").write_text(json.dumps(legacy))
    reused = train_specialists(config, group=1, out=out, workdir=d)["specialists"][0]
    assert reused.reused and reused.params == everything["specialists"][1].params
    # A re-clustered groups file gives group 1 other classes: it is trained again, not reused.
    ClassGroups(6, [f"c{i}" for i in range(6)], [[0, 1], [4, 5]]).save(d / "groups.json")
    again = train_specialists(config, group=1, out=out, workdir=d)
    assert not again["specialists"][0].reused and again["specialists"][0].details["classes"] == [4, 5]


# ------------------------------------------------------------------------------------------ scripts

SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_only_orchestrate(script):
    """No script edits ``sys.path`` or imports another script: what they share is in the library."""
    tree = ast.parse(script.read_text())
    names = {s.stem for s in SCRIPTS}
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & names, f"{script.name} imports scripts {sorted(imported & names)}"
    assert "sys.path" not in script.read_text()


# ------------------------------------------------------------------------------------------ selection


def test_choose_on_validation_reads_validation_only_and_records_the_choice(tmp_path, capsys):
    config = tiny_config(tmp_path)
    candidates = {
        "h4": ["--model.init_args.net.init_args.hidden=[4]"],
        "h16": ["--model.init_args.net.init_args.hidden=[16]"],
    }
    argv = ["choose", "--name", "width", "--config", str(config), "--workdir", str(tmp_path), "--out", "sel"]
    code, out, _ = run_kd(capsys, *argv, "--candidates", json.dumps(candidates))
    assert code is None
    printed = json.loads(out[out.index("{") :])
    record = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert printed["chosen"] == record["chosen"]
    # Each candidate ran in its own directory, and its score is its stage's last validation accuracy.
    for c in candidates:
        stage = record["results"][c]
        assert Path(stage["checkpoint"]) == tmp_path / "sel" / c / "seed5" / "checkpoints" / "final.ckpt"
        assert record["scores"][c] == stage["metrics"]["val/acc"] and record["arguments"][c] == candidates[c]
    assert record["chosen"] == best_candidate(record["scores"])
    # Reused when asked again; a test metric is refused as what to choose on.
    again = choose_on_validation("width", config, candidates, "sel", tmp_path)
    assert all(r.reused for r in again.results.values()) and again.chosen == record["chosen"]
    with pytest.raises(ValueError, match="`monitor` must be a validation metric"):
        choose_on_validation("width", config, candidates, "sel", tmp_path, monitor="test/acc")
    with pytest.raises(ValueError, match="`candidates`: names must be"):
        choose_on_validation("width", config, {"a b": []}, "sel", tmp_path)


def test_best_candidate_errors():
    with pytest.raises(ValueError, match="`scores` is empty"):
        best_candidate({})
    with pytest.raises(ValueError, match="not finite"):
        best_candidate({"a": float("nan")})
    assert best_candidate({"a": 1.0, "b": 1.0}) == "a"
