"""The reproduction script's experiment functions on tiny data (scripts/reproduce.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinySource, load_script

ROOT = Path(__file__).resolve().parents[1]


repro = load_script("reproduce")
TINY = repro.Budget(limit_batches=2, seeds=(0,))
DM = {"batch_size": 32, "eval_batch_size": 64, "val_size": 64}


def _teacher_logits(source):
    dm = repro.IndexedDataModule(source, **DM)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, source.num_classes))
    return repro.teacher_train_logits(teacher, dm), teacher


def test_choose_bias_picks_the_validation_optimum():
    logits = torch.zeros(4, 3)
    logits[:, 0] = 1.0
    targets = torch.tensor([2, 2, 2, 0])  # shifting class 2 up by > 1 gets 3 of 4 right
    bias, accs = repro.choose_bias(logits, targets, 2, [0.0, 0.5, 2.0])
    assert bias == 2.0 and accs == [0.25, 0.25, 0.75]


def test_omitted_class_tunes_the_bias_on_validation_only(monkeypatch):
    source = TinySource(4)
    logits, _ = _teacher_logits(source)
    seen, chosen = [], []
    original = repro.choose_bias

    def spy(val_logits, val_targets, cls, grid):
        seen.append(len(val_targets))
        chosen.append(original(val_logits, val_targets, cls, grid))
        return chosen[-1]

    monkeypatch.setattr(repro, "choose_bias", spy)
    calls = []
    orig_predict = repro.predict

    def spy_predict(model, loader):
        out = orig_predict(model, loader)
        calls.append(loader.dataset)
        return out

    monkeypatch.setattr(repro, "predict", spy_predict)
    r = repro.omitted_class(source, logits, 1, 1, TINY, DM, grid=(0.0, 1.0))
    assert seen == [64]  # the validation split's size
    # The bias is chosen on predictions over the training file's held-out part (256 samples): the
    # validation split. The test file (64 samples) is predicted only afterwards, to report.
    assert len(calls) == 2
    assert len(calls[0].source) == 256 and len(calls[1].source) == 64
    # The reported bias and accuracies are the validation choice's, and the class count is the test file's.
    assert (r["bias"], r["val_accs"]) == chosen[0]
    assert r["n_cls"] == int((source.load(train=False)[1] == 1).sum())
    _, cls_errors, cls_acc = r["before"]
    assert cls_acc == pytest.approx(1 - cls_errors / r["n_cls"])


def test_omit_class_drops_it_from_the_transfer_set_only():
    dm = repro.ReproDataModule(TinySource(4), omit_class=2, **DM)
    dm.setup("fit")
    assert (dm.train_set.targets != 2).all() and (dm.val_set.targets == 2).any()


def test_temperature_sweep_has_one_row_per_size_and_temperature():
    source = TinySource(4)
    logits, _ = _teacher_logits(source)
    rows = repro.temperature_sweep(source, logits, {"a": (8,), "b": (4,)}, [1.0, 4.0, 20.0], 1, TINY, DM)
    assert [(r["student"], r["T"]) for r in rows] == [(s, t) for s in "ab" for t in (1.0, 4.0, 20.0)]
    # Errors and accuracy are counted over the 64 test samples.
    assert all(r["acc"] == 1.0 - r["errors"] / 64 for r in rows)


def test_distilled_batches_carry_the_cached_logits_by_index():
    source = TinySource(4)
    logits, _ = _teacher_logits(source)
    dm = repro.ReproDataModule(source, teacher_logits=logits, **DM)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["teacher_logits"], logits[batch["index"]])


def test_gap_closure_reports_every_seed():
    source = TinySource(4)
    _, teacher = _teacher_logits(source)
    budget = repro.Budget(limit_batches=2, seeds=(0, 1))
    r = repro.gap_closure("tiny", source, teacher, (8,), 1, budget, DM)
    assert len(r["alone"]) == len(r["distilled"]) == 2 and r["n_test"] == 64


def test_early_stopping_restores_the_best_validation_epoch(monkeypatch):
    kept, accs = [], []
    original = repro.KeepBest

    class Spy(original):
        def __init__(self):
            super().__init__()
            kept.append(self)

        def on_train_epoch_end(self, trainer, pl_module):
            accs.append(float(trainer.callback_metrics["val/acc"]))
            super().on_train_epoch_end(trainer, pl_module)

    monkeypatch.setattr(repro, "KeepBest", Spy)
    model, _ = repro.fit_student(TinySource(4), (8,), 0, 3, TINY, early_stop=True, **DM)
    # The kept epoch is the first with the best validation accuracy of the three.
    assert len(kept) == 1 and len(accs) == 3 and kept[0].best_epoch == accs.index(max(accs))
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept[0].state[name])


def test_extra_training_appends_to_the_training_file_only():
    base, extra = TinySource(4, n_train=40, n_test=10), TinySource(4, n_train=30, n_test=20, seed=1)
    both = repro.ExtraTraining(base, extra)
    data, y = both.load(True)
    assert len(data) == len(y) == 70
    assert torch.equal(data.tensors[0][40:], extra.load(True)[0].tensors[0])
    assert torch.equal(both.load(False)[1], base.load(False)[1])


def test_extra_training_refuses_a_different_task():
    with pytest.raises(ValueError, match="`extra` must have base's 4 classes"):
        repro.ExtraTraining(TinySource(4), TinySource(3))


def test_transfer_set_distils_without_labels_and_compares_with_them(monkeypatch):
    calls = []
    original = repro.fit_student

    def spy(source, hidden, seed, epochs, budget, logits=None, **kwargs):
        calls.append((logits is not None, kwargs.get("hard_weight")))
        return original(source, hidden, seed, epochs, budget, logits, **kwargs)

    monkeypatch.setattr(repro, "fit_student", spy)
    source = repro.ExtraTraining(TinySource(4), TinySource(4, seed=1))
    _, teacher = _teacher_logits(TinySource(4))
    r = repro.transfer_set(source, teacher, (8,), 1, TINY, DM, {"temperature": 4.0, "hard_weight": 0.5})
    assert calls == [(True, 0.0), (False, 0.5)]
    # Each student's (errors, accuracy) counted over the base's 64 test samples.
    assert r["n_train"] == 512 - 64 and all(r[k][1] == 1.0 - r[k][0] / 64 for k in ("soft", "labels"))


def test_one_cycle_anneals_the_learning_rate():
    # Four steps: shorter than OneCycle's warm-up can divide (pct_start=0.25), yet it must run.
    model, _ = repro.fit_student(TinySource(4), (8,), 0, 2, TINY, lr=1e-2, one_cycle=True, **DM)
    lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    assert isinstance(model.lr_schedule, repro.OneCycle) and lr < 1e-2 / 25


def test_gap_closed_share_matches_the_papers_arithmetic():
    assert round(repro._closed(67, [146], [74]), 3) == round(72 / 79, 3)
    assert repro._closed(10, [20, 30], [10, 10]) == 1.0


def test_recipe_is_read_from_the_config():
    words = repro._recipe(ROOT / "configs" / "fashion_mnist" / "distill_cached.yaml")
    assert words.startswith("T=4, hard-label weight 0.5") and "OneCycle" in words
