"""The paper's experiments on tiny data (kd_lightning.workflows.reproduction): teacher checkpoint -> store -> students."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import TinySource
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

import kd_lightning.workflows.reproduction as repro
from kd_lightning.datamodules import MNIST1D, ExtraTraining, IndexedDataModule
from kd_lightning.models import CNN1D, MLP
from kd_lightning.modules import DistillationModule, load_teacher
from kd_lightning.optim import OneCycle
from kd_lightning.store import SoftTargetStore

ROOT = Path(__file__).resolve().parents[1]
TINY = repro.Budget(limit_batches=2, seeds=(0,))
DM = {"batch_size": 32, "eval_batch_size": 64, "val_size": 64}


def _teacher(source, tmp_path, store="store") -> repro.SoftTargets:
    """A logistic-regression teacher fitted for two batches, its checkpoint, and a store directory."""
    checkpoint = repro.fit_teacher(
        partial(MLP, hidden=()), source, 1, TINY, DM, tmp_path / "teacher", lr=1e-2
    )
    return repro.SoftTargets(checkpoint, tmp_path / store)


def _train_file_logits(teacher: repro.SoftTargets, source) -> torch.Tensor:
    """The teacher's logits for every sample of the training file, by ``index`` (computed directly)."""
    dm = IndexedDataModule(source, **DM)
    dm.setup("fit")
    net = load_teacher(teacher.checkpoint)
    out = torch.zeros(len(source.load(train=True)[1]), source.num_classes)
    for split in (dm.train_set, dm.val_set):
        logits, _, idx = repro.predict(net, DataLoader(split, batch_size=1000))
        out[idx] = logits
    return out


class _Record(Callback):
    """Records the training batches (after the cache filled them), ``val/acc`` per epoch and each save."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.accs: list[float] = []
        self.saved: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.accs.append(float(trainer.callback_metrics["val/acc"]))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        state = {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()}
        self.saved.append((checkpoint["epoch"], state))


def test_choose_bias_picks_the_validation_optimum():
    logits = torch.zeros(4, 3)
    logits[:, 0] = 1.0
    targets = torch.tensor([2, 2, 2, 0])  # shifting class 2 up by > 1 gets 3 of 4 right
    bias, accs = repro.choose_bias(logits, targets, 2, [0.0, 0.5, 2.0])
    assert bias == 2.0 and accs == [0.25, 0.25, 0.75]


def test_omitted_class_tunes_the_bias_on_validation_only(monkeypatch, tmp_path):
    source = TinySource(4)
    teacher = _teacher(source, tmp_path)
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
    r = repro.omitted_class(source, teacher, 1, 1, TINY, DM, grid=(0.0, 1.0))
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
    # The student's transfer set lacked the class: its store holds no sample of it.
    header = (teacher.store / "train" / "header.json").read_text()
    dm = IndexedDataModule(source, omit_classes=(1,), **DM)
    dm.setup("fit")
    assert f'"length": {len(dm.train_set)}' in header and (dm.train_set.targets != 1).all()


def test_temperature_sweep_has_one_row_per_size_and_temperature(tmp_path):
    source = TinySource(4)
    teacher = _teacher(source, tmp_path)
    rows = repro.temperature_sweep(source, teacher, {"a": (8,), "b": (4,)}, [1.0, 4.0, 20.0], 1, TINY, DM)
    assert [(r["student"], r["T"]) for r in rows] == [(s, t) for s in "ab" for t in (1.0, 4.0, 20.0)]
    # Errors and accuracy are counted over the 64 test samples.
    assert all(r["acc"] == 1.0 - r["errors"] / 64 for r in rows)


def test_distilled_batches_carry_the_cached_logits_by_index(tmp_path):
    source = TinySource(4)
    teacher = _teacher(source, tmp_path)
    logits = _train_file_logits(teacher, source)
    record = _Record()
    model, _ = repro.fit_student(source, (8,), 0, 1, TINY, teacher, callbacks=[record], **DM)
    # A student without a teacher in memory: every target came from the store, built from the checkpoint.
    assert isinstance(model, DistillationModule) and model.teacher is None
    assert len(record.batches) == 2
    for batch in record.batches:
        assert torch.equal(batch["teacher_logits"], logits[batch["index"]])
    # Full fp32 logits; a second student on the same split reuses the store instead of rebuilding it.
    header = teacher.store / "train" / "header.json"
    assert '"dtype": "float32"' in header.read_text()
    before = header.stat()
    record = _Record()
    repro.fit_student(source, (8,), 1, 1, TINY, teacher, callbacks=[record], **DM)
    after = header.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert all(torch.equal(b["teacher_logits"], logits[b["index"]]) for b in record.batches)


def test_gap_closure_reports_every_seed(tmp_path):
    source = TinySource(4)
    teacher = _teacher(source, tmp_path)
    budget = repro.Budget(limit_batches=2, seeds=(0, 1))
    r = repro.gap_closure("tiny", source, teacher, (8,), 1, budget, DM)
    assert len(r["alone"]) == len(r["distilled"]) == 2 and r["n_test"] == 64
    # The teacher's row is its checkpoint's test errors.
    dm = IndexedDataModule(source, **DM)
    assert r["teacher"] == repro.errors_on_test_split(load_teacher(teacher.checkpoint), dm)


def test_early_stopping_restores_the_best_validation_epoch():
    record = _Record()
    model, _ = repro.fit_student(TinySource(4), (8,), 0, 3, TINY, early_stop=True, callbacks=[record], **DM)
    checkpoints = [c for c in model.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].monitor == "val/acc" and checkpoints[0].mode == "max"
    # A checkpoint is written only when val/acc improves: the last one written is the first epoch with
    # the best validation accuracy of the three, and its weights are the model's.
    assert len(record.accs) == 3 and record.saved[-1][0] == record.accs.index(max(record.accs))
    for name, value in model.state_dict().items():
        assert torch.equal(value, record.saved[-1][1][name])


def test_transfer_set_distils_without_labels_and_compares_with_them(monkeypatch, tmp_path):
    calls = []
    original = repro.fit_student

    def spy(source, hidden, seed, epochs, budget, teacher=None, **kwargs):
        calls.append((teacher is not None, kwargs.get("hard_weight")))
        return original(source, hidden, seed, epochs, budget, teacher, **kwargs)

    monkeypatch.setattr(repro, "fit_student", spy)
    source = ExtraTraining(TinySource(4), TinySource(4, seed=1))
    teacher = _teacher(TinySource(4), tmp_path)
    r = repro.transfer_set(source, teacher, (8,), 1, TINY, DM, {"temperature": 4.0, "hard_weight": 0.5})
    assert calls == [(True, 0.0), (False, 0.5)]
    # Each student's (errors, accuracy) counted over the base's 64 test samples.
    assert r["n_train"] == 512 - 64 and all(r[k][1] == 1.0 - r[k][0] / 64 for k in ("soft", "labels"))


def test_one_cycle_anneals_the_learning_rate():
    # Four steps: shorter than OneCycle's warm-up can divide (pct_start=0.25), yet it must run.
    model, _ = repro.fit_student(TinySource(4), (8,), 0, 2, TINY, lr=1e-2, one_cycle=True, **DM)
    lr = model.trainer.optimizers[0].param_groups[0]["lr"]
    assert isinstance(model.lr_schedule, OneCycle) and lr < 1e-2 / 25


def test_fit_teacher_checkpoint_reloads_the_fitted_teacher(tmp_path):
    source = TinySource(4)
    path = repro.fit_teacher(partial(MLP, hidden=(8,)), source, 2, TINY, DM, tmp_path, lr=1e-2)
    assert Path(path) == tmp_path / "teacher.ckpt"
    # Fitted again with the same seed, the teacher is the same: its checkpoint is replaced, not versioned.
    again = repro.fit_teacher(partial(MLP, hidden=(8,)), source, 2, TINY, DM, tmp_path, lr=1e-2)
    assert again == path and sorted(p.name for p in tmp_path.iterdir()) == ["teacher.ckpt"]
    x = source.load(train=False)[0].tensors[0]
    first, second = load_teacher(path), load_teacher(again)
    assert torch.equal(first(x), second(x))


def test_mnist1d_cnn_teacher_to_store_to_students(tmp_path):
    """The MNIST-1D path of the reproduction end to end, on a small budget: a CNN1D teacher fitted and
    checkpointed, its store built once, students alone and distilled from it, and a label-free one."""
    budget = repro.Budget(limit_batches=1.0, seeds=(0,))
    kwargs = {"batch_size": 64, "eval_batch_size": 1000, "val_size": 0.1}
    source = MNIST1D(num_samples=1000)
    path = repro.fit_teacher(partial(CNN1D, channels=16), source, 3, budget, kwargs, tmp_path, lr=3e-3)
    teacher = repro.SoftTargets(path, tmp_path / "stores" / "mnist1d")
    fit = {"lr": 3e-3, "temperature": 20.0, "hard_weight": 0.1}
    gap = repro.gap_closure("MNIST-1D", source, teacher, (32,), 2, budget, kwargs, fit)
    assert gap["n_test"] == 200 and len(gap["alone"]) == len(gap["distilled"]) == 1
    # The store holds the checkpointed teacher's logits for every training sample of the split.
    dm = IndexedDataModule(source, **kwargs)
    dm.setup("fit")
    expected, _, index = repro.predict(load_teacher(path), dm.train_dataloader())
    stored = SoftTargetStore.open(teacher.store / "train").lookup(index)
    # Same fp32 network and inputs, in batches of another size (1000 for the store, 64 here): the kernels
    # may sum each dot product in another order, a few ulps of the largest logit (equal on this machine).
    atol = 64 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert len(index) == 720 and torch.allclose(stored, expected, rtol=0, atol=atol)
    extra = ExtraTraining(source, MNIST1D(num_samples=500, seed=43))
    transfer = repro.SoftTargets(path, tmp_path / "stores" / "transfer")
    r = repro.transfer_set(extra, transfer, (32,), 1, budget, kwargs, fit)
    assert r["n_train"] == 800 + 400 - 120
    assert (teacher.store / "train").is_dir() and (transfer.store / "train").is_dir()


def test_gap_closed_share_matches_the_papers_arithmetic():
    assert round(repro.gap_closed(67, [146], [74]), 3) == round(72 / 79, 3)
    assert repro.gap_closed(10, [20, 30], [10, 10]) == 1.0


def test_recipe_is_read_from_the_config():
    words = repro.distillation_recipe(ROOT / "configs" / "fashion_mnist" / "distill_cached.yaml")
    assert words.startswith("T=4, hard-label weight 0.5") and "OneCycle" in words
