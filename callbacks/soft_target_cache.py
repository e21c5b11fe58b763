"""SoftTargetCache: the teacher runs once into a :mod:`~kd_lightning.store`, every student trains from it.

At the start of fitting the callback checks the store of each split it serves (``<path>/<split>``) against
the current teacher, data, transform and encoding, and verifies its content (one read pass: the
checksums of its header, and every soft target finite); a missing, stale or corrupt store is rebuilt
with a warning saying what differed (or, with ``rebuild=False``, fitting stops with an error naming the
store, the array and the first bad row). Before the teacher runs, a build checks that it can write
the store and that the store it replaces holds only its own files (a file of the user's there stops the
run, naming it; nothing is deleted); leftovers of killed builds are removed. During training and evaluation it
puts the stored logits into ``batch["teacher_logits"]`` (fp32, ``(N, C)``, on the module's device), keyed
by ``batch["index"]`` (and ``batch["view"]``), and :class:`~kd_lightning.modules.DistillationModule` then
never runs its teacher for those batches.

Where they are gathered (``gather_in``):

- ``"loader"`` (the default): the DataModule's loaders gather them as they make each batch
  (:class:`~kd_lightning.cache.StoreFeed`, installed through ``set_feed``: one gather per batch from the
  memory-mapped store, in the DataLoader's workers when it has any), so they arrive prefetched (pinned
  on a GPU) with the inputs and the training process does no store I/O. This covers the splits whose
  store is ready before their loader starts: ``train`` and ``val`` during fitting. A bare
  ``trainer.validate`` or ``trainer.test`` starts its loader before its store is checked: those batches
  are served as with ``"main"``. So is data without ``set_feed`` (with a warning).
- ``"main"``: the training process gathers them at the start of each batch, after the batch reached the
  device (the behaviour before ``gather_in`` existed; kept to measure one against the other).

Two modes:

- **fixed** (``views=None``, the default and the cheaper option): the teacher saw each sample
  un-augmented, once; the student may still train on augmented inputs, against those targets.
- **augmentation-consistent** (``views=V``): the DataModule's augmentation is replayable
  (``augment_seed``), and the store holds the teacher's outputs for views ``0 .. V-1`` of each sample, so
  the student and the teacher see the same augmented input. Views the store lacks (a DataModule
  serving more views than ``V``) fall back to running the teacher (hybrid), and the share served from
  the store is logged as ``cache/hit_rate``.

The work is done by :mod:`kd_lightning.cache` (the identity of a store, filling it, serving it); the
callback decides when, on which processes and with which teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from kd_lightning.cache import (
    FED,
    SPLITS,
    BuildStats,
    CacheableDataset,
    CacheDataModule,
    ClassCount,
    EpochSetting,
    FeedSetting,
    LiveTeacherNeed,
    LoaderOptions,
    NamedPrecision,
    ReplayableDataset,
    SoftTargets,
    StoreFeed,
    StoreIdentity,
    TeacherCarrier,
    check_buildable,
    check_datamodule,
    check_replayable,
    check_store,
    fill_missing,
    fill_store,
    soft_targets,
    split_dataset,
    teacher_identity,
)
from kd_lightning.store import (
    Encoding,
    SoftTargetStore,
    StaleStoreError,
    StoreError,
    compare,
    file_sha256,
    teacher_fingerprint,
)

T = TypeVar("T")
P = ParamSpec("P")

#: Where soft targets may be gathered (``SoftTargetCache(gather_in=...)``).
GATHER_IN = ("loader", "main")


def _check_served_by_logits(pl_module: L.LightningModule) -> None:
    """Refuse a module whose training needs more of its teacher than stored logits (intermediate features).

    Raises:
        ValueError: the module says why stored soft targets do not suffice.
    """
    reason = pl_module.live_teacher_reason() if isinstance(pl_module, LiveTeacherNeed) else None
    if reason is not None:
        raise ValueError(f"SoftTargetCache cannot serve {type(pl_module).__name__}: {reason}")


class SoftTargetCache(Callback):
    """Serve a teacher's soft targets from an on-disk store, building the store once when needed.

    Building runs the teacher under ``torch.inference_mode()`` in the Trainer's precision, ``batch_size``
    samples at a time, with a progress bar. Under DDP every process computes its own share of the
    batches and writes its rows into one shared store; the batches are cut the same way for any number
    of processes, so the store is bit-for-bit the one a single process builds. ``path`` must be on a
    filesystem that every process sees. (:func:`kd_lightning.cache.fill_store` does the same without a
    Trainer.)

    The teacher is this callback's ``teacher_ckpt`` (loaded only when a store must be built, checked or
    fallen back on; a complete store whose checkpoint file is unchanged needs no teacher in memory) or
    else the module's ``teacher``.

    Logs ``cache/hit_rate`` (training samples served from the store; below 1 only in hybrid use), and
    keeps :attr:`gather_seconds`: the training process's time on the current epoch's training soft targets.

    Args:
        path: directory of the stores, one subdirectory per split.
        kind: ``"logits"`` (all logits) or ``"topk"`` (``top_k`` log-probabilities with the residual mass
            spread uniformly over the other classes; see :func:`kd_lightning.store.topk_log_probs` for
            what that means at temperatures other than 1).
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` on disk.
        top_k: ``k`` for ``kind="topk"``.
        views: ``None`` for fixed mode; ``V >= 1`` stored augmentation views per training sample
            (augmentation-consistent mode, needs the DataModule's ``augment_seed``).
        rebuild: rebuild a missing, stale or corrupt store; ``False`` raises instead, touching nothing.
        batch_size: teacher batch size while building.
        splits: splits served from stores (``"train"``, ``"val"``, ``"test"``); ``"val"``/``"test"`` give
            teacher agreement in evaluation without a teacher.
        teacher_ckpt: teacher checkpoint for building; ``None`` uses the module's ``teacher``.
        gather_in: ``"loader"`` (where the batches are made, the default) or ``"main"`` (in the training
            process at each batch's start); see the module's docstring.

    Raises:
        ValueError: an unknown kind, dtype, split or ``gather_in``, ``top_k`` missing or given for logits,
            or non-positive ``views`` / ``batch_size``.
    """

    def __init__(
        self,
        path: str,
        kind: Literal["logits", "topk"] = "logits",
        dtype: Literal["float32", "float16", "bfloat16"] = "float16",
        top_k: int | None = None,
        views: int | None = None,
        rebuild: bool = True,
        batch_size: int = 1024,
        splits: Sequence[str] = ("train", "val"),
        teacher_ckpt: str | None = None,
        gather_in: Literal["loader", "main"] = "loader",
    ) -> None:
        self.encoding = Encoding(kind, dtype, top_k)
        if gather_in not in GATHER_IN:
            raise ValueError(f"`gather_in` must be one of {GATHER_IN}, got {gather_in!r}.")
        if views is not None and not (isinstance(views, int) and views >= 1):
            raise ValueError(f"`views` must be None (fixed mode) or a positive integer, got {views!r}.")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"`splits` must be a non-empty list of {SPLITS}, got {list(splits)!r}.")
        self.path = str(path)
        self.views = views
        self.rebuild = rebuild
        self.batch_size = batch_size
        self.splits = tuple(dict.fromkeys(splits))
        self.teacher_ckpt = teacher_ckpt
        self.gather_in = gather_in
        #: Per split built by this callback: samples, views, seconds, and bytes of soft targets.
        self.build_stats: dict[str, dict[str, float]] = {}
        self._stores: dict[str, SoftTargetStore] = {}
        self._datamodule: CacheDataModule | None = None
        self._teacher: nn.Module | None = None  # loaded from `teacher_ckpt`, on the module's device
        self._teacher_fp: str | None = None  # fingerprint of the teacher as loaded / as given
        self._ckpt_sha: str | None = None
        self._epoch = 0  # the epoch whose views the DataModule serves next (resumable)
        self._resumed_teachers: dict[str, str] = {}
        self._hits = self._seen = 0
        self._feeds: dict[str, StoreFeed] = {}  # installed on the DataModule, per split
        # Training batches of this epoch that came without the loader's soft targets, and the first epoch of
        # this fit (whose first batches loader workers may have made before the feeds were set).
        self._unfed = 0
        self._first_epoch: int | None = None
        self._warned_unfed = False
        self._serve_seconds = 0.0  # this epoch's training batches, in this process's hooks

    @property
    def gather_seconds(self) -> float:
        """Seconds the training process spent on this epoch's training soft targets: gathering from the
        store, moving them to the device, filling missing views (and, for a loader without workers, the
        loader's own gathers, which run in this process)."""
        feed = self._feeds.get("train")
        return self._serve_seconds + (feed.seconds if feed is not None else 0.0)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    # -----------------------------------------------------------------------------------------
    # Hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _check_served_by_logits(pl_module)
        # Checked afresh at every fit: the teacher file or the data may have changed in between.
        self._stores, self._teacher, self._teacher_fp, self._ckpt_sha = {}, None, None, None
        if stage == "fit":
            # A new run starts at epoch 0; a resumed one gets its epoch from `load_state_dict`, later.
            self._epoch, self._resumed_teachers = 0, {}
        self._first_epoch, self._warned_unfed = None, False
        self._datamodule = _named(check_datamodule, trainer.datamodule)
        self._check_data(pl_module, stage)
        # Fingerprint the module's teacher now: the Trainer converts it to its precision afterwards.
        teacher = _module_teacher(pl_module)
        if self.teacher_ckpt is None and teacher is not None:
            self._teacher_fp = teacher_fingerprint(teacher)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in ("train", "val"):
            if split in self.splits:
                self._prepare(trainer, pl_module, split)
        self._report_hybrid()
        self._release_teacher()
        self._set_epoch(self._epoch)
        if self.gather_in == "loader":
            self._install_feeds()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fitting prepared it already; a bare `trainer.validate` has not.
        if "val" in self.splits and "val" not in self._stores:
            self._prepare(trainer, pl_module, "val")
            self._release_teacher()

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.splits and "test" not in self._stores:
            self._prepare(trainer, pl_module, "test")
            self._release_teacher()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = trainer.current_epoch
        self._set_epoch(self._epoch)
        self._hits = self._seen = 0
        self._serve_seconds = 0.0
        self._unfed = 0
        if self._first_epoch is None:
            self._first_epoch = trainer.current_epoch
        if "train" in self._feeds:
            self._feeds["train"].seconds = 0.0

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoints written at this epoch's end resume at the next one.
        self._epoch = trainer.current_epoch + 1
        self._check_fed(trainer)
        if not self._seen:
            return
        # Once per epoch, not per step: a `log` call costs ten times the store lookup.
        pl_module.log("cache/hit_rate", self._hits / self._seen, on_step=False, on_epoch=True, sync_dist=True)
        if self._hits < self._seen:
            store = self._stores["train"]
            rank_zero_info(
                f"SoftTargetCache: epoch {trainer.current_epoch}: {self._hits}/{self._seen} training soft "
                f"targets from the store ({self._hits / self._seen:.1%}); the other {self._seen - self._hits} "
                f"(views >= {store.num_views}, not in {str(store.path)!r}) ran the teacher."
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._attach(trainer, pl_module, batch, "train")

    @override
    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._attach(trainer, pl_module, batch, "val")

    @override
    def on_test_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._attach(trainer, pl_module, batch, "test")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release_teacher()
        self._remove_feeds()

    @override
    def state_dict(self) -> dict[str, Any]:
        teachers = {split: store.header["teacher"]["fingerprint"] for split, store in self._stores.items()}
        return {"epoch": self._epoch, "teachers": teachers}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", 0))
        self._resumed_teachers = dict(state_dict.get("teachers", {}))
        # Before the first training batch is fetched, so a resumed run serves the views it would have.
        self._set_epoch(self._epoch)

    # -----------------------------------------------------------------------------------------
    # Checking and building (kd_lightning.cache.identity and .fill)

    def _check_data(self, pl_module: L.LightningModule, stage: str) -> None:
        classes = self._num_classes(pl_module)
        if self.encoding.kind == "topk" and self.encoding.top_k > classes:
            raise ValueError(
                f"SoftTargetCache `top_k`={self.encoding.top_k} exceeds the number of classes of the data "
                f"({classes}): choose 1 <= top_k <= {classes}, or kind='logits'."
            )
        if stage == "fit" and self.views is not None and "train" in self.splits:
            _named(check_replayable, self._dataset("train"), self.views)

    def _num_classes(self, pl_module: L.LightningModule) -> int:
        classes = pl_module.num_classes if isinstance(pl_module, ClassCount) else None
        return int(classes if classes is not None else self._data().num_classes)

    def _data(self) -> CacheDataModule:
        if self._datamodule is None:
            raise RuntimeError("SoftTargetCache: `setup` has not run: no DataModule yet.")
        return self._datamodule

    def _dataset(self, split: str) -> CacheableDataset:
        return _named(split_dataset, self._data(), split)

    def _consistent(self, split: str) -> bool:
        return split == "train" and self.views is not None

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        """Open the store of ``split``, building it first if it is missing or stale (decided on all ranks)."""
        path = Path(self.path) / split
        dataset = self._dataset(split)
        identity = StoreIdentity.of(
            dataset,
            self._data().fingerprint(split),
            num_classes=self._num_classes(pl_module),
            encoding=self.encoding,
            views=self.views if self._consistent(split) else None,
        )
        try:
            check = check_store(path, identity, partial(self._teacher_differences, trainer, pl_module, path))
        except StoreError as err:
            raise StoreError(f"SoftTargetCache {err}") from err
        reason = check.reason.rstrip(".") or "is not usable on every process"
        processes = _TrainerProcesses(trainer)
        store = check.store
        if not processes.all_true(store is not None):
            if not self.rebuild:
                raise StaleStoreError(
                    f"SoftTargetCache: the soft-target store {str(path)!r} {reason}, "
                    "and `rebuild` is False. Set `rebuild: true` to rebuild it (the old store is replaced only "
                    "once the new one is complete), or point `path` at another directory.",
                    check.differences,
                )
            try:
                check_buildable(path, processes)
            except StoreError as err:
                raise StoreError(f"SoftTargetCache `path`: {err}") from err
            if check.differences:  # replacing soft targets of another teacher, transform or encoding: say so
                rank_zero_warn(f"SoftTargetCache: rebuilding {str(path)!r}, which {reason}.")
            else:
                verb = "building" if reason == "does not exist" else "rebuilding"
                rank_zero_info(f"SoftTargetCache: {verb} {str(path)!r}: it {reason}.")
            store = self._build(trainer, pl_module, path, dataset, identity, split)
        self._stores[split] = store
        fp = store.header["teacher"]["fingerprint"]
        resumed = self._resumed_teachers.get(split)
        if resumed is not None and resumed != fp:
            rank_zero_warn(
                f"SoftTargetCache: this run resumes one trained on soft targets of teacher {resumed}, but "
                f"{str(path)!r} holds those of teacher {fp}."
            )

    def _teacher_differences(
        self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path, header: dict[str, Any]
    ) -> list[str]:
        """How the store's teacher differs from ours (a warning where there is no teacher to check)."""
        unchecked = ""
        if self.teacher_ckpt is not None:
            if not Path(self.teacher_ckpt).is_file():
                unchecked = f"`teacher_ckpt` {self.teacher_ckpt!r} does not exist"
            # An unchanged checkpoint file spares loading the teacher at all.
            elif header.get("teacher", {}).get("checkpoint_sha256") == self._checkpoint_sha():
                return []
            else:
                self._live_teacher(trainer, pl_module)
        if not unchecked and self._teacher_fp is None:
            unchecked = "no `teacher_ckpt` and the module has no teacher"
        if unchecked:
            rank_zero_warn(
                f"SoftTargetCache: no teacher to check {str(path)!r} against ({unchecked}); using it as the soft "
                f"targets of teacher {header.get('teacher', {}).get('fingerprint')}, whose identity is not verified."
            )
            return []
        return compare(header, {"teacher": {"fingerprint": self._teacher_fp}})

    def _checkpoint_sha(self) -> str:
        if self._ckpt_sha is None:
            self._ckpt_sha = file_sha256(self.teacher_ckpt)
        return self._ckpt_sha

    def _live_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """The teacher, on the module's device in the Trainer's precision, loading ``teacher_ckpt`` if needed."""
        if self.teacher_ckpt is None:
            teacher = _module_teacher(pl_module)
            if teacher is None:
                raise RuntimeError(
                    f"SoftTargetCache has no teacher to run (to build a store under {self.path!r}, or for views "
                    "not in it): set the callback's `teacher_ckpt` or give the module a teacher."
                )
            return teacher
        if self._teacher is None:
            from kd_lightning.modules import load_teacher  # the modules import Lightning's heavier parts

            # Building the network before loading its weights draws from the global RNG; whether the cache
            # had to load a teacher must not change the shuffling or initialisation of the run.
            with torch.random.fork_rng(devices=[]):
                teacher = load_teacher(self.teacher_ckpt)
            self._teacher_fp = teacher_fingerprint(teacher)
            teacher = trainer.precision_plugin.convert_module(teacher)
            self._teacher = teacher.to(pl_module.device).eval().requires_grad_(False)
        return self._teacher

    def _release_teacher(self) -> None:
        # The stores are complete: a teacher this callback loaded is not needed unless views are missing.
        self._teacher = None

    def _build(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        path: Path,
        dataset: CacheableDataset,
        identity: StoreIdentity,
        split: str,
    ) -> SoftTargetStore:
        teacher = self._live_teacher(trainer, pl_module)
        # Timed from here: loading the teacher is not part of building (plain inference needs it too).
        start_time = time.perf_counter()
        record = teacher_identity(
            teacher,
            fingerprint=self._teacher_fp,
            checkpoint=self.teacher_ckpt,
            checkpoint_sha256=self._checkpoint_sha() if self.teacher_ckpt is not None else None,
        )
        data = self._data()
        options = data if isinstance(data, LoaderOptions) else None
        store = fill_store(
            teacher,
            dataset,
            path,
            identity,
            teacher_record=record,
            batch_size=self.batch_size,
            device=pl_module.device,
            precision=NamedPrecision(str(trainer.precision), trainer.precision_plugin),
            collective=_TrainerProcesses(trainer),
            num_workers=options.num_workers if options is not None else 0,
            pin_memory=bool(options.pin_memory) if options is not None else False,
            progress=trainer.progress_bar_callback is not None,
            log=lambda message: rank_zero_info(f"SoftTargetCache: {message}"),
        )
        self.build_stats[split] = BuildStats.of(store, time.perf_counter() - start_time).as_dict()
        return store

    # -----------------------------------------------------------------------------------------
    # Serving (kd_lightning.cache.serve)

    def _install_feeds(self) -> None:
        """Serve the prepared splits from the DataModule's loaders (before they start)."""
        data = self._data()
        if not isinstance(data, FeedSetting):
            rank_zero_warn(
                f"SoftTargetCache(gather_in='loader'): the DataModule ({type(data).__name__}) has no "
                "`set_feed(split, feed)` (kd_lightning.cache.FeedSetting): soft targets are gathered in the "
                "training process at each batch's start instead, as with gather_in='main'."
            )
            return
        for split, store in self._stores.items():
            self._feeds[split] = StoreFeed(store, by_view=self._consistent(split))
            data.set_feed(split, self._feeds[split])

    def _check_fed(self, trainer: L.Trainer) -> None:
        """Warn (once) when the training loader did not gather soft targets after the first epoch.

        In the first epoch of a fit, loader workers started before fitting (Lightning counts the steps of a
        learning-rate schedule by starting the training loader) have made their first batches before the
        feeds were set: those are gathered here, in the training process. Later epochs start their loaders
        afresh, so every batch must come with its soft targets.
        """
        if not self._unfed or trainer.current_epoch == self._first_epoch or self._warned_unfed:
            return
        self._warned_unfed = True
        rank_zero_warn(
            f"SoftTargetCache(gather_in='loader'): {self._unfed} training batch(es) of epoch {trainer.current_epoch} "
            "came without the soft targets their loader should have gathered (a loader made without the "
            "DataModule's `loader_kwargs(split)`?); the training process gathered them instead."
        )

    def _remove_feeds(self) -> None:
        data = self._datamodule
        if isinstance(data, FeedSetting):
            for split in self._feeds:
                data.set_feed(split, None)
        self._feeds = {}

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, split: str) -> None:
        store = self._stores.get(split)
        if store is None:
            return
        start = time.perf_counter()
        fallback = partial(self._teacher_logits, trainer, pl_module)
        fed = batch.pop(FED, None) if isinstance(batch, dict) else None
        if isinstance(fed, SoftTargets):  # gathered where the batch was made
            logits = fed.logits
            hits = fill_missing(logits, fed.missing, batch["input"], fallback, repr(str(store.path)))
        else:
            self._unfed += split == "train" and "train" in self._feeds
            logits, hits = _named(
                soft_targets,
                store,
                batch,
                pl_module.device,
                by_view=self._consistent(split),
                fallback=fallback,
            )
        batch["teacher_logits"] = logits
        if split == "train":
            self._hits += hits
            self._seen += len(logits)
            self._serve_seconds += time.perf_counter() - start

    def _teacher_logits(self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: Tensor) -> Tensor:
        """The live teacher's logits, for views the store lacks."""
        teacher = self._live_teacher(trainer, pl_module)
        # no_grad, not inference_mode: the result is a loss target.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return teacher(inputs).float()

    def _report_hybrid(self) -> None:
        if not self._consistent("train") or "train" not in self._stores:
            return
        train = self._dataset("train")
        served = train.views if isinstance(train, ReplayableDataset) else None
        if served is None or served > self.views:
            rank_zero_info(
                f"SoftTargetCache: the data serves {'a new view every epoch' if served is None else f'{served} views'} "
                f"per sample and the store holds {self.views}: views >= {self.views} run the teacher (see cache/hit_rate)."
            )

    def _set_epoch(self, epoch: int) -> None:
        if isinstance(self._datamodule, EpochSetting):
            self._datamodule.set_epoch(epoch)


def _module_teacher(pl_module: L.LightningModule) -> nn.Module | None:
    """The module's own teacher, if it carries one."""
    teacher = pl_module.teacher if isinstance(pl_module, TeacherCarrier) else None
    return teacher if isinstance(teacher, nn.Module) else None


def _named(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, its ValueError prefixed with the callback's name."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        if isinstance(err, StoreError):
            raise
        raise ValueError(f"SoftTargetCache: {err}") from err


class _TrainerProcesses:
    """The Trainer's processes as a :class:`~kd_lightning.cache.protocols.Collective`."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def broadcast(self, obj: T, src: int = 0) -> T:
        return self.trainer.strategy.broadcast(obj, src=src)

    def barrier(self, name: str | None = None) -> None:
        self.trainer.strategy.barrier(name)

    def all_true(self, decision: bool) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)
