"""The small-scale experiments of Hinton, Vinyals & Dean (2015), sections 3-4, as library functions.

``scripts/reproduce.py`` runs them and writes the report (docs/reproduction.md); each function here
trains and measures, and returns plain numbers. They are built from the product's own parts:

- a teacher is a :class:`~kd_lightning.modules.ClassifierModule` fitted by a Trainer whose
  ``ModelCheckpoint`` writes its checkpoint (:func:`fit_teacher`), or any checkpoint of this package;
- a distilled student is a :class:`~kd_lightning.modules.DistillationModule` without a teacher in
  memory: the :class:`~kd_lightning.callbacks.SoftTargetCache` callback builds, from the teacher
  checkpoint, a store of the teacher's full fp32 logits over the training split, or reuses the one
  already there, and serves ``batch["teacher_logits"]`` (:class:`SoftTargets`);
- early stopping is ``ModelCheckpoint(monitor="val/acc", mode="max")`` and reloading its checkpoint.

Every run is on one CPU process, without logger or progress bar. This module sits with the entry
points (it assembles callbacks and datamodules, as ``kd`` does); nothing in the library imports it.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.callbacks import SoftTargetCache
from kd_lightning.datamodules import ClassificationSource, IndexedDataModule
from kd_lightning.ensemble import predict_logits
from kd_lightning.models import MLP
from kd_lightning.modules import (
    ClassifierBase,
    ClassifierModule,
    DistillationModule,
    NetFactory,
    load_teacher,
)
from kd_lightning.objectives import HintonKD
from kd_lightning.optim import OneCycle


@dataclass
class Budget:
    """Epochs and data limits of one run of the experiments (``scripts/reproduce.py --quick`` shrinks them)."""

    sweep_epochs: int = 8
    sweep_fraction: float = 0.25
    mnist1d_epochs: int = 100
    mnist1d_teacher_epochs: int = 60
    regulariser_epochs: int = 60
    omitted_epochs: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 8.0, 12.0, 20.0)
    limit_batches: int | float = 1.0
    mnist1d_samples: int = 5000
    mnist1d_generated: int = 50_000  # generated signals, of which train_split (80%) extend the transfer set
    transfer_epochs: int = 10
    fmnist_seeds: tuple[int, ...] = (1, 2, 3)  # scripts/benchmark_kd.py's seeds: its runs are reused

    @classmethod
    def quick(cls) -> Budget:
        """Tiny epochs and subsets: a plumbing check of every experiment in minutes."""
        return cls(
            sweep_epochs=1,
            sweep_fraction=0.05,
            mnist1d_epochs=3,
            mnist1d_teacher_epochs=3,
            regulariser_epochs=3,
            omitted_epochs=1,
            seeds=(0, 1),
            temperatures=(1.0, 4.0),
            limit_batches=20,
            mnist1d_samples=1000,
            mnist1d_generated=2000,
            transfer_epochs=1,
            fmnist_seeds=(1,),
        )


@dataclass(frozen=True)
class SoftTargets:
    """Where a distilled student's soft targets come from: a teacher checkpoint and the directory of the
    soft-target store built from it.

    Students that train on the same training split share one store: the first fit builds it, the
    others reuse it (the cache compares teacher, data and encoding first, and rebuilds a stale store
    with a warning). Give each training split (fraction, left-out classes, extra inputs) its own
    ``store``, so that the stores of different experiments do not replace each other.

    Args:
        checkpoint: a teacher checkpoint written by this package (see :func:`fit_teacher`).
        store: the store's directory (the callback's ``path``; the training split is ``<store>/train``).
    """

    checkpoint: str
    store: Path

    def cache(self) -> SoftTargetCache:
        """The callback that serves these targets: the teacher's full fp32 logits (no loss of precision),
        for the training split only, computed 1000 samples at a time."""
        return SoftTargetCache(
            str(self.store),
            kind="logits",
            dtype="float32",
            splits=("train",),
            teacher_ckpt=str(self.checkpoint),
            batch_size=1000,
        )


def _trainer(epochs: int, budget: Budget, callbacks: Sequence[L.Callback] = (), **kwargs: Any) -> L.Trainer:
    """A quiet one-process CPU Trainer; it writes checkpoints only through a ``ModelCheckpoint`` given."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=budget.limit_batches,
        callbacks=list(callbacks),
        **kwargs,
    )


def _optimizer(lr: float = 1e-3, weight_decay: float = 0.0) -> Callable[..., torch.optim.Optimizer]:
    return partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def predict(model: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, targets and stable indices of ``model`` over ``loader`` (eval mode, no gradients)."""
    return predict_logits(model, loader, indices=True)  # type: ignore[return-value]


def errors_on_test_split(model: nn.Module, dm: IndexedDataModule) -> tuple[int, float]:
    """(test errors, test accuracy) of ``model`` on ``dm``'s test split."""
    dm.setup("test")
    logits, targets, _ = predict(model, dm.test_dataloader())
    errors = int((logits.argmax(-1) != targets).sum())
    return errors, 1.0 - errors / len(targets)


def fit_teacher(
    net: NetFactory,
    source: ClassificationSource,
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    directory: str | Path,
    lr: float = 1e-3,
    seed: int = 0,
) -> str:
    """Fit a teacher with cross-entropy (AdamW at a constant ``lr``, no validation) and return the path of
    the checkpoint its ``ModelCheckpoint`` wrote after the last epoch (``<directory>/teacher.ckpt``,
    replaced if it exists)."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = ClassifierModule(net, source.num_classes, source.input_shape, _optimizer(lr))
    checkpoint = ModelCheckpoint(dirpath=directory, filename="teacher", enable_version_counter=False)
    _trainer(epochs, budget, [checkpoint], limit_val_batches=0).fit(
        module, datamodule=IndexedDataModule(source, **dm_kwargs)
    )
    return checkpoint.best_model_path


def fit_student(
    source: ClassificationSource,
    hidden: tuple[int, ...],
    seed: int,
    epochs: int,
    budget: Budget,
    teacher: SoftTargets | None = None,
    temperature: float = 20.0,
    hard_weight: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    one_cycle: bool = False,
    early_stop: bool = False,
    callbacks: Sequence[L.Callback] = (),
    **dm_kwargs: Any,
) -> tuple[ClassifierBase, IndexedDataModule]:
    """Train one MLP student: on hard labels when ``teacher`` is None, else distilled (HintonKD) from the
    teacher's soft targets, served from its store by :class:`~kd_lightning.callbacks.SoftTargetCache`.

    With ``one_cycle`` the learning rate follows :class:`~kd_lightning.optim.OneCycle` (peak ``lr``), as
    in the shipped Fashion-MNIST student configs; otherwise it is constant. Without ``early_stop`` there
    is no validation; with it the weights of the first epoch with the best ``val/acc`` are restored
    (``ModelCheckpoint(monitor="val/acc", mode="max")``, in a temporary directory; the paper
    early-stopped its 3%-data hard-target model). ``callbacks`` run after the cache, so they see the
    batches it filled. ``dm_kwargs`` go to :class:`~kd_lightning.datamodules.IndexedDataModule`
    (``train_fraction``, ``omit_classes``, ...).

    Returns:
        the trained module and its DataModule (set up for fitting).
    """
    L.seed_everything(seed, workers=True, verbose=False)
    dm = IndexedDataModule(source, **dm_kwargs)
    net = partial(MLP, hidden=hidden)
    common: dict[str, Any] = {
        "optimizer": _optimizer(lr, weight_decay),
        "lr_schedule": OneCycle() if one_cycle else None,
    }
    fit_callbacks = list(callbacks)
    if teacher is None:
        module: ClassifierBase = ClassifierModule(net, source.num_classes, source.input_shape, **common)
    else:
        module = DistillationModule(
            net,
            source.num_classes,
            source.input_shape,
            objective=HintonKD(temperature=temperature, hard_weight=hard_weight),
            **common,
        )
        fit_callbacks.insert(0, teacher.cache())
    if not early_stop:
        _trainer(epochs, budget, fit_callbacks, limit_val_batches=0).fit(module, datamodule=dm)
        return module, dm
    with tempfile.TemporaryDirectory(prefix="kd-early-stop-") as directory:
        best = ModelCheckpoint(dirpath=directory, monitor="val/acc", mode="max", save_top_k=1)
        _trainer(epochs, budget, [*fit_callbacks, best]).fit(module, datamodule=dm)
        # weights_only=False: the hyperparameters hold the network and optimizer factories.
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    return module, dm


# --------------------------------------------------------------------------------------------- experiments


def gap_closed(teacher: float, alone: Sequence[float], distilled: Sequence[float]) -> float:
    """Share of the teacher-student error gap that distillation closes (mean errors over seeds); NaN when
    the teacher makes no fewer errors than the student alone (there is no gap to close).

    Example (the paper's MNIST numbers):
        >>> round(gap_closed(67, [146], [74]), 3)
        0.911
    """
    gap = statistics.fmean(alone) - teacher
    return (statistics.fmean(alone) - statistics.fmean(distilled)) / gap if gap > 0 else float("nan")


def distillation_recipe(config: Path) -> str:
    """A distillation config's recipe in words, read from the file (so that a report cannot drift from it)."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    model = cfg["model"]["init_args"]
    kd, opt = model["objective"]["init_args"], model["optimizer"]["init_args"]
    schedule = (model.get("lr_schedule") or {}).get("class_path", "constant lr").rsplit(".", 1)[-1]
    return (
        f"T={kd['temperature']:g}, hard-label weight {kd['hard_weight']:g}, AdamW lr {opt['lr']:g} "
        f"weight decay {opt.get('weight_decay', 0):g}, {schedule}, {cfg['trainer']['max_epochs']} epochs"
    )


def gap_closure(
    name: str,
    source: ClassificationSource,
    teacher: SoftTargets,
    student_hidden: tuple[int, ...],
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Teacher vs student alone vs distilled student (``budget.seeds``); returns errors and accuracies.

    ``fit`` holds :func:`fit_student`'s recipe arguments (``temperature``, ``hard_weight``, ``lr``, ...),
    the same for both students: only the targets differ."""
    dm = IndexedDataModule(source, **dm_kwargs)
    t_err, t_acc = errors_on_test_split(load_teacher(teacher.checkpoint), dm)
    rows: dict[str, list[tuple[int, float]]] = {"alone": [], "distilled": []}
    for seed in budget.seeds:
        for kind, targets in (("alone", None), ("distilled", teacher)):
            model, sdm = fit_student(
                source, student_hidden, seed, epochs, budget, targets, **(fit or {}), **dm_kwargs
            )
            rows[kind].append(errors_on_test_split(model, sdm))
    return {"name": name, "teacher": (t_err, t_acc), **rows, "n_test": len(dm.test_set)}


def transfer_set(
    source: ClassificationSource,
    teacher: SoftTargets,
    student_hidden: tuple[int, ...],
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    fit: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """On a larger transfer set (``source``, e.g. :class:`~kd_lightning.datamodules.ExtraTraining`): a
    student distilled with no hard labels at all (``hard_weight=0``: the teacher labels every input), and,
    for honesty, the same student trained on the true labels of the same inputs. Test (errors, accuracy)
    of each, and the number of training inputs."""
    soft, sdm = fit_student(
        source, student_hidden, seed, epochs, budget, teacher, **{**fit, "hard_weight": 0.0}, **dm_kwargs
    )
    hard, hdm = fit_student(source, student_hidden, seed, epochs, budget, None, **fit, **dm_kwargs)
    return {
        "soft": errors_on_test_split(soft, sdm),
        "labels": errors_on_test_split(hard, hdm),
        "n_train": len(sdm.train_set),
    }


def temperature_sweep(
    source: ClassificationSource,
    teacher: SoftTargets,
    sizes: dict[str, tuple[int, ...]],
    temperatures: Sequence[float],
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    seed: int = 0,
    fit: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (student size, temperature): test errors and accuracy of the distilled student."""
    rows = []
    for label, hidden in sizes.items():
        for t in temperatures:
            model, dm = fit_student(
                source, hidden, seed, epochs, budget, teacher, temperature=t, **(fit or {}), **dm_kwargs
            )
            err, acc = errors_on_test_split(model, dm)
            rows.append({"student": label, "T": float(t), "errors": err, "acc": acc})
    return rows


def choose_bias(
    val_logits: Tensor, val_targets: Tensor, cls: int, grid: Sequence[float]
) -> tuple[float, list[float]]:
    """The shift of class ``cls``'s logit (bias) that maximises accuracy on the given (validation) data.

    Ties go to the smallest shift in absolute value.

    Args:
        val_logits: ``(N, C)`` logits of validation samples (never the test set: the paper tuned on test).
        val_targets: their labels.
        cls: the class whose bias is shifted.
        grid: candidate shifts.

    Returns:
        (best shift, validation accuracy at every shift of ``grid``).

    Raises:
        ValueError: ``cls`` is not a class id of ``val_logits``.
    """
    if not 0 <= cls < val_logits.shape[1]:
        raise ValueError(f"`cls` must be a class id in [0, {val_logits.shape[1]}), got {cls}.")
    accs = []
    for b in grid:
        shifted = val_logits.clone()
        shifted[:, cls] += b
        accs.append(float((shifted.argmax(-1) == val_targets).float().mean()))
    best = max(range(len(grid)), key=lambda i: (accs[i], -abs(grid[i])))
    return float(grid[best]), accs


def omitted_class(
    source: ClassificationSource,
    teacher: SoftTargets,
    cls: int,
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    grid: Sequence[float] = tuple(x / 2 for x in range(0, 31)),
    temperature: float = 20.0,
    fit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Distil into an 800-800 MLP on a transfer set without class ``cls`` (``omit_classes``); then shift
    that class's bias, chosen on the validation split only, and report test errors and the class's
    accuracy before and after."""
    model, dm = fit_student(
        source,
        (800, 800),
        0,
        epochs,
        budget,
        teacher,
        temperature=temperature,
        omit_classes=(cls,),
        **(fit or {}),
        **dm_kwargs,
    )
    val_logits, val_targets, _ = predict(model, dm.val_dataloader())
    bias, val_accs = choose_bias(val_logits, val_targets, cls, grid)
    dm.setup("test")
    test_logits, test_targets, _ = predict(model, dm.test_dataloader())

    def score(shift: float) -> tuple[int, int, float]:
        lg = test_logits.clone()
        lg[:, cls] += shift
        wrong = lg.argmax(-1) != test_targets
        of_cls = test_targets == cls
        return int(wrong.sum()), int((wrong & of_cls).sum()), float((~wrong[of_cls]).float().mean())

    return {
        "cls": cls,
        "before": score(0.0),
        "after": score(bias),
        "bias": bias,
        "grid": list(grid),
        "val_accs": val_accs,
        "n_cls": int((test_targets == cls).sum()),
    }


def regulariser(
    source: ClassificationSource,
    teacher: SoftTargets,
    fraction: float,
    epochs: int,
    budget: Budget,
    dm_kwargs: dict[str, Any],
    temperature: float = 20.0,
    fit: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Hard targets (early-stopped on validation) vs soft targets on ``fraction`` of the training data,
    and hard targets on all of it; test accuracy of an 800-800 MLP each."""
    fit = fit or {}
    out: dict[str, float] = {}
    small = {**fit, **dm_kwargs, "train_fraction": fraction}
    m, dm = fit_student(source, (800, 800), 0, epochs, budget, None, early_stop=True, **small)
    out["hard_small"] = errors_on_test_split(m, dm)[1]
    m, dm = fit_student(source, (800, 800), 0, epochs, budget, teacher, temperature=temperature, **small)
    out["soft_small"] = errors_on_test_split(m, dm)[1]
    # The whole training split needs far fewer epochs for as many optimizer steps.
    full_epochs = max(1, round(epochs * fraction * 4))
    m, dm = fit_student(source, (800, 800), 0, full_epochs, budget, None, **fit, **dm_kwargs)
    out["hard_full"] = errors_on_test_split(m, dm)[1]
    out["full_epochs"] = full_epochs
    return out
