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

Two modes:

- **fixed** (``views=None``, the default and the cheaper option): the teacher saw each sample
  un-augmented, once; the student may still train on augmented inputs, against those targets.
- **augmentation-consistent** (``views=V``): the DataModule's augmentation is replayable
  (``augment_seed``), and the store holds the teacher's outputs for views ``0 .. V-1`` of each sample, so
  the student and the teacher see the same augmented input. Views the store lacks (a DataModule
  serving more views than ``V``) fall back to running the teacher (hybrid), and the share served from
  the store is logged as ``cache/hit_rate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from typing_extensions import override

from kd_lightning.store import (
    INDEX,
    CorruptStoreError,
    Encoding,
    SoftTargetStore,
    StaleStoreError,
    StoreError,
    StoreWriter,
    array_sha256,
    check_can_build,
    compare,
    describe,
    file_sha256,
    new_token,
    read_header,
    teacher_fingerprint,
)

SPLITS = ("train", "val", "test")
# Un-augmented inputs hashed into a dataset's fingerprint: catches changed files or normalisation that
# leave the targets alone, for a few reads.
_SAMPLED_INPUTS = 64


class SoftTargetCache(Callback):
    """Serve a teacher's soft targets from an on-disk store, building the store once when needed.

    Building runs the teacher under ``torch.inference_mode()`` in the Trainer's precision, ``batch_size``
    samples at a time, with a progress bar. Under DDP every process computes its own share of the
    batches and writes its rows into one shared store; the batches are cut the same way for any number
    of processes, so the store is bit-for-bit the one a single process builds. ``path`` must be on a
    filesystem that every process sees.

    The teacher is this callback's ``teacher_ckpt`` (loaded only when a store must be built, checked or
    fallen back on; a complete store whose checkpoint file is unchanged needs no teacher in memory) or
    else the module's ``teacher``.

    Logs ``cache/hit_rate`` (training samples served from the store; below 1 only in hybrid use).

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

    Raises:
        ValueError: an unknown kind, dtype or split, ``top_k`` missing or given for logits, or
            non-positive ``views`` / ``batch_size``.
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
    ) -> None:
        self.encoding = Encoding(kind, dtype, top_k)
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
        #: Per split built by this callback: samples, views, seconds, and bytes of soft targets.
        self.build_stats: dict[str, dict[str, float]] = {}
        self._stores: dict[str, SoftTargetStore] = {}
        self._datamodule: Any = None
        self._teacher: nn.Module | None = None  # loaded from `teacher_ckpt`, on the module's device
        self._teacher_fp: str | None = None  # fingerprint of the teacher as loaded / as given
        self._ckpt_sha: str | None = None
        self._epoch = 0  # the epoch whose views the DataModule serves next (resumable)
        self._resumed_teachers: dict[str, str] = {}
        self._hits = self._seen = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    # -----------------------------------------------------------------------------------------
    # Hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._datamodule = trainer.datamodule
        # Checked afresh at every fit: the teacher file or the data may have changed in between.
        self._stores, self._teacher, self._teacher_fp, self._ckpt_sha = {}, None, None, None
        if stage == "fit":
            # A new run starts at epoch 0; a resumed one gets its epoch from `load_state_dict`, later.
            self._epoch, self._resumed_teachers = 0, {}
        self._check_datamodule(trainer, pl_module, stage)
        # Fingerprint the module's teacher now: the Trainer converts it to its precision afterwards.
        teacher = getattr(pl_module, "teacher", None)
        if self.teacher_ckpt is None and isinstance(teacher, nn.Module):
            self._teacher_fp = teacher_fingerprint(teacher)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in ("train", "val"):
            if split in self.splits:
                self._prepare(trainer, pl_module, split)
        self._report_hybrid(trainer)
        self._release_teacher()
        self._set_epoch(self._epoch)

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

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoints written at this epoch's end resume at the next one.
        self._epoch = trainer.current_epoch + 1
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
    # Checking and building

    def _check_datamodule(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = self._datamodule
        if dm is None or not callable(getattr(dm, "fingerprint", None)):
            raise ValueError(
                "SoftTargetCache needs the data from a DataModule with `fingerprint(split)` and "
                "`<split>_set` datasets (e.g. kd_lightning.datamodules.IndexedDataModule), passed as "
                f"`trainer.fit(model, datamodule=...)`; got {type(dm).__name__ if dm is not None else None}."
            )
        classes = self._num_classes(pl_module)
        if self.encoding.kind == "topk" and self.encoding.top_k > classes:
            raise ValueError(
                f"SoftTargetCache `top_k`={self.encoding.top_k} exceeds the number of classes of the data "
                f"({classes}): choose 1 <= top_k <= {classes}, or kind='logits'."
            )
        if stage == "fit" and self.views is not None and "train" in self.splits:
            train = self._dataset("train")
            if not getattr(train, "replayable", False):
                raise ValueError(
                    f"SoftTargetCache(views={self.views}) is augmentation-consistent: the teacher's outputs are "
                    "stored per augmentation view, which needs replayable augmentation. Set the DataModule's "
                    "`augment_seed` (and `augment_views`), or use `views: null` (fixed mode)."
                )

    def _num_classes(self, pl_module: L.LightningModule) -> int:
        classes = getattr(pl_module, "num_classes", None)
        return int(classes if classes is not None else self._datamodule.num_classes)

    def _dataset(self, split: str) -> Any:
        dataset = getattr(self._datamodule, f"{split}_set", None)
        needed = ("indices", "input_of")
        if dataset is None or not all(hasattr(dataset, a) for a in needed):
            raise ValueError(
                f"SoftTargetCache: the DataModule has no usable `{split}_set` for split {split!r} (needs a "
                f"dataset with {needed}, like kd_lightning.datamodules.IndexedDataset); got {type(dataset).__name__}."
            )
        return dataset

    def _consistent(self, split: str) -> bool:
        return split == "train" and self.views is not None

    def _identity(self, pl_module: L.LightningModule, split: str) -> dict[str, Any]:
        """What a store of ``split`` must record to serve this run (the teacher apart)."""
        dataset = self._dataset(split)
        picks = np.unique(
            np.linspace(0, len(dataset.indices) - 1, min(len(dataset.indices), _SAMPLED_INPUTS)).round()
        )
        sample = [dataset.input_of(int(dataset.indices[int(i)])).detach().cpu().numpy() for i in picks]
        data = {
            **self._datamodule.fingerprint(split),
            "indices": array_sha256(dataset.indices),
            "inputs": array_sha256(np.concatenate([s.ravel() for s in sample])) if sample else None,
        }
        if self._consistent(split):
            transform = {
                "teacher_input": "augmented",
                "augmentation": describe(dataset.transform),
                "augment_seed": dataset.augment_seed,
            }
        else:
            transform = {"teacher_input": "un-augmented"}
        return {
            "dataset": data,
            "transform": transform,
            "num_classes": self._num_classes(pl_module),
            "num_views": self.views if self._consistent(split) else 1,
            "encoding": self.encoding.describe(),
        }

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        """Open the store of ``split``, building it first if it is missing or stale (decided on all ranks)."""
        path = Path(self.path) / split
        identity = self._identity(pl_module, split)
        store, reason, differences = self._check(trainer, pl_module, path, identity)
        reason = reason.rstrip(".") or "is not usable on every process"
        usable = trainer.strategy.reduce_boolean_decision(store is not None, all=True)
        if not usable:
            if not self.rebuild:
                raise StaleStoreError(
                    f"SoftTargetCache: the soft-target store {str(path)!r} {reason}, "
                    "and `rebuild` is False. Set `rebuild: true` to rebuild it (the old store is replaced only "
                    "once the new one is complete), or point `path` at another directory.",
                    differences,
                )
            self._check_can_build(trainer, path)
            if differences:  # replacing soft targets of another teacher, transform or encoding: say so loudly
                rank_zero_warn(f"SoftTargetCache: rebuilding {str(path)!r}, which {reason}.")
            else:
                verb = "building" if reason == "does not exist" else "rebuilding"
                rank_zero_info(f"SoftTargetCache: {verb} {str(path)!r}: it {reason}.")
            store = self._build(trainer, pl_module, path, identity, split)
        self._stores[split] = store
        fp = store.header["teacher"]["fingerprint"]
        resumed = self._resumed_teachers.get(split)
        if resumed is not None and resumed != fp:
            rank_zero_warn(
                f"SoftTargetCache: this run resumes one trained on soft targets of teacher {resumed}, but "
                f"{str(path)!r} holds those of teacher {fp}."
            )

    def _check(
        self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path, identity: dict[str, Any]
    ) -> tuple[SoftTargetStore | None, str, list[str]]:
        """(the store if usable, else None; why not; the differing fields)."""
        try:
            header = read_header(path)
        except FileNotFoundError:
            return None, "does not exist", []
        except StaleStoreError as err:
            return None, f"is stale: {err}", err.differences
        except StoreError as err:
            # Not ours: never built over, whatever `rebuild` says.
            raise StoreError(f"SoftTargetCache `path`: {err} Choose another `path`.") from err
        if header.get("complete") is not True:
            found = header.get("complete", "<missing>")
            return (
                None,
                "is incomplete (its build did not finish)",
                [f"complete: store has {found!r}, a finished build has True"],
            )
        # Another dataset or split is most likely a wrong `path`: never built over, whatever `rebuild` says.
        # (Changed targets, length or inputs of the same dataset make a store stale, not foreign.)
        owner = compare(header, {"dataset": {k: identity["dataset"][k] for k in ("dataset", "split")}})
        if owner:
            raise StoreError(
                f"SoftTargetCache `path`: the soft-target store {str(path)!r} belongs to another dataset or split "
                f"({'; '.join(owner)}); it is left as it is. Choose another `path`, or delete the store."
            )
        differences = compare(header, identity)
        teacher, unchecked = self._teacher_differences(trainer, pl_module, header)
        if unchecked:
            rank_zero_warn(
                f"SoftTargetCache: no teacher to check {str(path)!r} against ({unchecked}); using it as the soft "
                f"targets of teacher {header.get('teacher', {}).get('fingerprint')}, whose identity is not verified."
            )
        differences += teacher
        if differences:
            return None, "is stale: " + "; ".join(differences), differences
        try:
            return SoftTargetStore.open(path, verify=True), "", []
        except CorruptStoreError as err:
            return None, f"is corrupt: {err}", [str(err)]
        except StoreError as err:
            return None, f"cannot be used: {err}", [str(err)]

    def _check_can_build(self, trainer: L.Trainer, path: Path) -> None:
        """Before the teacher runs: the store can be written, and replacing it loses nothing of the user's.

        Checked on every process (one shared filesystem, or not); all raise if any fails.
        """
        error = None
        try:
            check_can_build(path)
        except StoreError as err:
            error = err
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            if error is not None:
                raise StoreError(f"SoftTargetCache `path`: {error}") from error
            raise StoreError(
                f"SoftTargetCache `path`: the soft-target store {str(path)!r} cannot be built on another "
                "process (see its error)."
            )

    def _teacher_differences(
        self, trainer: L.Trainer, pl_module: L.LightningModule, header: dict[str, Any]
    ) -> tuple[list[str], str]:
        """(how the store's teacher differs from ours; why it could not be checked, or "")."""
        if self.teacher_ckpt is not None:
            if not Path(self.teacher_ckpt).is_file():
                return [], f"`teacher_ckpt` {self.teacher_ckpt!r} does not exist"
            # An unchanged checkpoint file spares loading the teacher at all.
            if header.get("teacher", {}).get("checkpoint_sha256") == self._checkpoint_sha():
                return [], ""
            self._live_teacher(trainer, pl_module)
        if self._teacher_fp is None:
            return [], "no `teacher_ckpt` and the module has no teacher"
        return compare(header, {"teacher": {"fingerprint": self._teacher_fp}}), ""

    def _checkpoint_sha(self) -> str:
        if self._ckpt_sha is None:
            self._ckpt_sha = file_sha256(self.teacher_ckpt)
        return self._ckpt_sha

    def _live_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """The teacher, on the module's device in the Trainer's precision, loading ``teacher_ckpt`` if needed."""
        if self.teacher_ckpt is None:
            teacher = getattr(pl_module, "teacher", None)
            if not isinstance(teacher, nn.Module):
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
        identity: dict[str, Any],
        split: str,
    ) -> SoftTargetStore:
        strategy = trainer.strategy
        rank, world = trainer.global_rank, trainer.world_size
        teacher = self._live_teacher(trainer, pl_module)
        # Timed from here: loading the teacher is not part of building (plain inference needs it too).
        start_time = time.perf_counter()
        fingerprint = self._teacher_fp if self._teacher_fp is not None else teacher_fingerprint(teacher)
        identity = {
            "teacher": {
                "fingerprint": fingerprint,
                "architecture": type(teacher).__qualname__,
                "checkpoint": self.teacher_ckpt,
                "checkpoint_sha256": self._checkpoint_sha() if self.teacher_ckpt is not None else None,
            },
            **identity,
        }
        dataset = self._dataset(split)
        views, length = identity["num_views"], len(dataset.indices)
        token = strategy.broadcast(new_token() if rank == 0 else None, src=0)
        if rank == 0:
            writer = StoreWriter.create(
                path, self.encoding, identity["num_classes"], dataset.indices, views, identity, token
            )
            for leftover in writer.removed_leftovers:
                rank_zero_info(f"SoftTargetCache: removed {str(leftover)!r}, left by an interrupted build.")
        strategy.barrier("soft_target_cache:create")
        if rank != 0:
            writer = StoreWriter.attach(path, token)
        # Batches are cut from the rows alone and dealt round-robin to the ranks, so every row is computed
        # in the same batch whatever the number of processes: one store, identical to a 1-process build.
        jobs = [
            (v, s, min(s + self.batch_size, length))
            for v in range(views)
            for s in range(0, length, self.batch_size)
        ]
        mine = jobs[rank::world]
        try:
            self._run_teacher(trainer, pl_module, teacher, dataset, mine, writer, split)
            writer.close()
        except BaseException:
            if rank == 0:
                writer.abort()  # an interrupted build leaves nothing that looks like a store
            raise
        strategy.barrier("soft_target_cache:written")
        if rank == 0:
            seconds = time.perf_counter() - start_time
            writer.commit(
                {
                    "precision": str(trainer.precision),
                    "world_size": world,
                    "batch_size": self.batch_size,
                    "seconds": round(seconds, 3),
                }
            )
        strategy.barrier("soft_target_cache:committed")
        store = SoftTargetStore.open(path, verify=False)  # the commit has just hashed and checked it
        seconds = time.perf_counter() - start_time
        # Soft targets only: the 8-byte sample index per row is the same for every format.
        size = sum(
            math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
            for name, spec in store.header["arrays"].items()
            if name != INDEX
        )
        self.build_stats[split] = {"samples": length, "views": views, "seconds": seconds, "bytes": size}
        rank_zero_info(
            f"SoftTargetCache: built {str(path)!r}: {length} samples x {views} views in {seconds:.1f} s "
            f"({length * views / seconds:.0f} samples/s on {world} process(es)), {size / max(1, length * views):.1f} "
            "bytes per sample and view."
        )
        return store

    def _run_teacher(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        teacher: nn.Module,
        dataset: Any,
        jobs: list[tuple[int, int, int]],
        writer: StoreWriter,
        split: str,
    ) -> None:
        dm = self._datamodule
        device = pl_module.device
        loader = DataLoader(
            _TeacherInputs(dataset, augmented=self._consistent(split)),
            batch_sampler=_Jobs(jobs),
            num_workers=getattr(dm, "num_workers", 0),
            pin_memory=bool(getattr(dm, "pin_memory", False)) and device.type == "cuda",
            # Its own generator: building must not move the global RNG the training run shuffles with.
            generator=torch.Generator(),
        )
        precision = trainer.precision_plugin
        samples = sum(stop - start for _, start, stop in jobs)
        bar = tqdm(
            total=samples,
            desc=f"soft targets ({split})",
            unit="sample",
            dynamic_ncols=True,
            leave=False,
            disable=trainer.global_rank != 0 or trainer.progress_bar_callback is None,
        )
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.inference_mode(), precision.forward_context():
                for (view, start, _), x in zip(jobs, loader, strict=True):
                    x = precision.convert_input(x.to(device, non_blocking=True))
                    writer.write(view, start, teacher(x).float())
                    bar.update(x.shape[0])
        finally:
            bar.close()
            teacher.train(was_training)

    # -----------------------------------------------------------------------------------------
    # Serving

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, split: str) -> None:
        store = self._stores.get(split)
        if store is None:
            return
        if not isinstance(batch, dict) or "index" not in batch:
            raise ValueError(
                "SoftTargetCache: batches must be dicts with an 'index' entry (the batch contract of "
                f"docs/architecture.md); got {type(batch).__name__} with keys {list(batch) if isinstance(batch, dict) else None}."
            )
        index = batch["index"]
        n = len(index)
        device = pl_module.device
        if not self._consistent(split):
            logits, hits = store.lookup(index).to(device, non_blocking=True), n
        else:
            logits, hits = self._consistent_targets(trainer, pl_module, store, batch)
        batch["teacher_logits"] = logits
        if split == "train":
            self._hits += hits
            self._seen += n

    def _consistent_targets(
        self, trainer: L.Trainer, pl_module: L.LightningModule, store: SoftTargetStore, batch: dict[str, Any]
    ) -> tuple[Tensor, int]:
        if "view" not in batch:
            raise ValueError(
                f"SoftTargetCache(views={self.views}): training batches carry no 'view'; the DataModule's "
                "augmentation must be replayable (`augment_seed`)."
            )
        device = pl_module.device
        view = batch["view"].cpu()
        hit = view < store.num_views
        hits = int(hit.sum())
        if hits == len(view):
            return store.lookup(batch["index"], view).to(device, non_blocking=True), hits
        # Hybrid: the views the store lacks are computed live, never replaced by another view's targets.
        out = torch.empty(len(view), store.num_classes, device=device)
        if hits:
            hit_dev = hit.to(device)
            out[hit_dev] = store.lookup(batch["index"].cpu()[hit], view[hit]).to(device)
        miss = (~hit).to(device)
        teacher = self._live_teacher(trainer, pl_module)
        # no_grad, not inference_mode: the result is a loss target.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            out[miss] = teacher(batch["input"][miss]).float()
        return out, hits

    def _report_hybrid(self, trainer: L.Trainer) -> None:
        if not self._consistent("train") or "train" not in self._stores:
            return
        served = getattr(self._dataset("train"), "views", None)
        if served is None or served > self.views:
            rank_zero_info(
                f"SoftTargetCache: the data serves {'a new view every epoch' if served is None else f'{served} views'} "
                f"per sample and the store holds {self.views}: views >= {self.views} run the teacher (see cache/hit_rate)."
            )

    def _set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self._datamodule, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


class _TeacherInputs(Dataset):
    """What the teacher sees for a ``(view, row)`` key: that replayed view, or the un-augmented input."""

    def __init__(self, dataset: Any, augmented: bool) -> None:
        self.dataset = dataset
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.dataset.indices)

    def __getitem__(self, key: tuple[int, int]) -> Tensor:
        view, row = key
        index = int(self.dataset.indices[row])
        return self.dataset.input_of(index, view if self.augmented else None)


class _Jobs(Sampler):
    """Batches of ``(view, row)`` keys, one per ``(view, start, stop)`` job."""

    def __init__(self, jobs: list[tuple[int, int, int]]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for view, start, stop in self.jobs:
            yield [(view, row) for row in range(start, stop)]
