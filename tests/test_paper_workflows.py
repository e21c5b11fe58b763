"""The paper's MNIST experiments as ``kd`` stages on the shipped MNIST-1D configs, at tiny budgets:
gap closure (choices on validation, the first seed's run reused), the temperature sweep, the omitted
class (bias chosen on validation), soft targets on little data (the early-stopped stage tests its best
epoch), and the validation curves read back from the CSV logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.workflows.mechanism import gap_closure
from kd_lightning.workflows.omitted_class import omitted_class
from kd_lightning.workflows.small_data import small_data
from kd_lightning.workflows.stage import StageResult, validation_curve
from kd_lightning.workflows.temperature_sweep import best_temperatures, temperature_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mnist1d"
# 300 signals (240 training, 40 of them validation), batches of 32: a few steps per epoch.
TINY = [
    "--data.init_args.source.init_args.num_samples=300",
    "--data.init_args.val_size=40",
    "--data.init_args.batch_size=32",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def mechanism(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mechanism")
    result = gap_closure(
        CONFIGS,
        "runs/gap",
        workdir,
        seeds=(1, 2),
        teacher_candidates={"none": ["--data.init_args.train_transform=null"], "shift": []},
        temperatures=(2.0, 10.0),
        teacher_epochs=2,
        student_epochs=2,
        overrides=TINY,
    )
    return workdir, result


@pytest.mark.slow  # about 11 kd stages on tiny data: ~40 s on a busy 2-core machine
def test_gap_closure_chooses_on_validation_and_reuses_the_chosen_run(mechanism):
    workdir, r = mechanism
    assert r.teacher.chosen == max(r.teacher.scores, key=r.teacher.scores.get)
    assert r.temperature.chosen == max(r.temperature.scores, key=r.temperature.scores.get)
    # The first seed's distilled run is the chosen temperature candidate's own stage.
    assert r.distilled[0].reused and r.distilled[0].checkpoint == r.temperature.result.checkpoint
    assert not r.distilled[1].reused and len(r.alone) == 2
    assert r.budget["epochs"] == 4
    record = r.record()
    json.dumps(record)
    expected = (sum(x.test_acc for x in r.distilled) - sum(x.test_acc for x in r.alone)) / 2
    gap = r.teacher.result.test_acc - sum(x.test_acc for x in r.alone) / 2
    if gap > 0:
        assert record["closed"] == pytest.approx(expected / gap)
    selection = json.loads((workdir / "runs/gap/distilled/selection.json").read_text())
    assert selection["chosen"] == r.temperature.chosen


@pytest.mark.slow
def test_validation_curves_are_read_from_the_csv_logs(mechanism):
    _, r = mechanism
    curve = validation_curve(r.alone[0])
    assert len(curve) == 2 and all(0.0 <= v <= 1.0 for v in curve)
    assert curve[-1] == pytest.approx(r.alone[0].metrics["val/acc"])
    with pytest.raises(ValueError, match="`metric` 'val/nothing' is not in .*its columns"):
        validation_curve(r.alone[0], "val/nothing")


@pytest.mark.parametrize(
    "bad, message",
    [({"temperatures": ()}, "`temperatures` is empty"), ({"budgets": (0,)}, "`budgets` >= 1 epoch")],
)
def test_a_bad_sweep_is_refused_before_anything_runs(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        temperature_sweep(CONFIGS / "mlp_distill.yaml", tmp_path / "none.ckpt", "runs/sweep", tmp_path, **bad)
    assert not (tmp_path / "runs").exists()


def test_a_run_without_csv_logs_is_named(tmp_path):
    result = StageResult("x", "kd fit", str(tmp_path / "run" / "checkpoints" / "final.ckpt"), 0.5, 1, 1.0)
    with pytest.raises(FileNotFoundError, match="stage 'x': no csv/version_\\*/metrics.csv"):
        validation_curve(result)


@pytest.mark.slow
def test_temperature_sweep_runs_every_setting(mechanism):
    workdir, r = mechanism
    rows = temperature_sweep(
        CONFIGS / "mlp_distill.yaml",
        r.teacher.result.checkpoint,
        "runs/sweep",
        workdir,
        students={"tiny": [4, 4]},
        temperatures=(1.0, 4.0),
        budgets=(1, 2),
        overrides=TINY,
    )
    assert [(x["T"], x["epochs"]) for x in rows] == [(1.0, 1), (4.0, 1), (1.0, 2), (4.0, 2)]
    best = best_temperatures(rows)
    assert set(best) == {("tiny", 1), ("tiny", 2)}


@pytest.mark.slow
def test_omitted_class_chooses_the_bias_on_validation(mechanism):
    workdir, r = mechanism
    (row,) = omitted_class(
        CONFIGS / "mlp_distill.yaml",
        r.teacher.result.checkpoint,
        "runs/omitted",
        workdir,
        cls=3,
        epochs=2,
        grid=(0.0, 1.0, 2.0),
        overrides=TINY,
    )
    assert row["bias"] in (0.0, 1.0, 2.0)
    assert row["bias"] == (0.0, 1.0, 2.0)[max(range(3), key=lambda i: (row["val_accs"][i], -i))]
    assert row["n_cls"] > 0 and row["n_test"] == 60
    assert row["before"]["shift"] == 0.0 and row["after"]["shift"] == row["bias"]
    assert row["before"]["errors_on_class"] <= row["n_cls"]


@pytest.mark.slow
def test_small_data_tests_the_best_epoch_of_the_early_stopped_student(mechanism):
    workdir, r = mechanism
    (row,) = small_data(
        CONFIGS / "mlp_student_early_stopped.yaml",
        CONFIGS / "mlp_distill.yaml",
        r.alone[0].checkpoint,
        "runs/small",
        workdir,
        fraction=0.5,
        epochs=3,
        seeds=(1,),
        overrides=TINY,
    )
    hard_dir = workdir / "runs/small/hard/seed1/checkpoints"
    record = json.loads((hard_dir / "result.json").read_text())
    assert record["checkpoint"] == str(hard_dir / "best.ckpt")
    best = torch.load(hard_dir / "best.ckpt", map_location="cpu", weights_only=False)
    callbacks = [v for k, v in best["callbacks"].items() if "'monitor': 'val/acc'" in k]
    # The stage's validation accuracy is the best epoch's, which the checkpoint recorded as its score.
    assert float(callbacks[0]["best_model_score"]) == pytest.approx(row["hard_best_val"])
    assert 0.0 <= row["soft"] <= 1.0


def test_one_cycle_runs_when_training_is_shorter_than_its_warm_up(tmp_path):
    """Four steps, fewer than OneCycle's warm-up can divide (pct_start=0.25): it runs and anneals."""
    from functools import partial

    from conftest import TinySource
    from trainers import quiet_trainer

    from kd_lightning.datamodules import IndexedDataModule
    from kd_lightning.models import MLP
    from kd_lightning.modules import ClassifierModule
    from kd_lightning.optim import OneCycle

    model = ClassifierModule(
        partial(MLP, hidden=(8,)), 4, (1, 8, 8), partial(torch.optim.AdamW, lr=1e-2), OneCycle()
    )
    data = IndexedDataModule(TinySource(4), batch_size=32, eval_batch_size=64, val_size=64)
    quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(model, data)
    assert model.trainer.global_step == 4
    assert model.trainer.optimizers[0].param_groups[0]["lr"] < 1e-2 / 25
