"""ArtifactLogger: the run's products as W&B artifacts, and what it was made from (lineage).

Products, logged when ``fit`` ends (and a ``validate`` run, for the groups file):

- each ModelCheckpoint's checkpoint (its best, else its last written file): type ``model``;
- each soft-target store a :class:`~kd_lightning.callbacks.soft_target_cache.SoftTargetCache` *built* in this run:
  type ``soft-targets``, its header as metadata, its arrays as ``file://`` references (checksummed,
  not copied: a store can be as large as the dataset);
- each :class:`~kd_lightning.callbacks.confusion_clustering.ConfusionClustering` groups file (and its heatmap):
  type ``class-groups``.

Inputs, recorded when training starts: the teacher checkpoint (the module's ``teacher_ckpt`` or the
cache's), every member checkpoint of an ensemble teacher (or of an ensemble module) under ``members``, the
stores served from disk, and a specialist's ``generalist_ckpt`` / ``groups_file``.
They always go into the run's config under ``lineage`` (path, SHA-256 or fingerprints, artifact
name), so an offline run keeps them too; an online run also marks them as used artifacts
(``run.use_artifact``; it raises offline, hence only online), which draws the lineage graph in W&B.

Artifact names come from the file's path relative to the working directory
(``runs/fashion_mnist/teacher/checkpoints/final.ckpt`` -> ``model-runs-fashion_mnist-teacher-...``),
so the teacher's run and its students' runs name the same checkpoint the same way without talking to
each other; W&B versions a name by content.

Nothing here stops training: a W&B error is a warning. Only global rank 0 talks to W&B.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from kd_lightning.callbacks.confusion_clustering import ConfusionClustering
from kd_lightning.callbacks.soft_target_cache import SoftTargetCache
from kd_lightning.ensemble import Ensemble
from kd_lightning.loggers import wandb_loggers, wandb_run
from kd_lightning.store import HEADER, file_sha256, read_header


def artifact_name(kind: str, path: str | Path) -> str:
    """``<kind>-<path relative to the working directory>``, in the characters W&B allows, at most 128."""
    path = Path(path).absolute()
    # Outside the working directory the absolute path names it.
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(path)).strip("-.")
    return f"{kind}-{slug}"[-128:].lstrip("-.")


def member_checkpoints(pl_module: L.LightningModule) -> list[str]:
    """The member checkpoints of every :class:`~kd_lightning.ensemble.Ensemble` in ``pl_module`` (a
    student's ensemble teacher, an ensemble module's network), in order; none for members given as modules."""
    return [
        path
        for module in pl_module.modules()
        if isinstance(module, Ensemble) and module.checkpoints
        for path in module.checkpoints
    ]


class ArtifactLogger(Callback):
    """Log checkpoints, soft-target stores and groups files as W&B artifacts and record the run's inputs.

    Without a WandbLogger the callback does nothing (checkpoints and files are on disk as always).

    Args:
        checkpoints: log ModelCheckpoint files (type ``model``).
        soft_targets: log stores built in this run (type ``soft-targets``).
        groups: log groups files (type ``class-groups``).
        lineage: record the inputs (config ``lineage``; ``use_artifact`` when online).
    """

    def __init__(
        self, checkpoints: bool = True, soft_targets: bool = True, groups: bool = True, lineage: bool = True
    ) -> None:
        self.checkpoints = checkpoints
        self.soft_targets = soft_targets
        self.groups = groups
        self.lineage = lineage
        #: Names of the artifacts this callback logged (rank 0), and of the inputs it recorded.
        self.logged: list[str] = []
        self.inputs: dict[str, Any] = {}

    # -----------------------------------------------------------------------------------------
    # Hooks

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After every on_fit_start: the cache has checked or built its stores by now.
        if self.lineage:
            self._guarded(trainer, "lineage", self._record_inputs, trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end / on_validation_end (the clustering heatmap is drawn there),
        # so this callback's place in the list does not matter; before the loggers are finalized.
        if stage == "fit":
            self._guarded(trainer, "artifacts", self._log_products, trainer)
        elif stage == "validate" and self.groups:  # a dedicated clustering run
            self._guarded(trainer, "artifacts", self._log_groups, trainer)

    # -----------------------------------------------------------------------------------------
    # Helpers

    def _guarded(self, trainer: L.Trainer, what: str, fn: Any, *args: Any) -> None:
        if not trainer.is_global_zero or not wandb_loggers(trainer):
            return
        import wandb

        try:
            fn(*args)
        except wandb.errors.Error as err:
            rank_zero_warn(
                f"ArtifactLogger: W&B {what} failed ({type(err).__name__}: {err}); training goes on."
            )

    def _runs(self, trainer: L.Trainer) -> list[Any]:
        return [run for run in map(wandb_run, wandb_loggers(trainer)) if run is not None]

    def _record_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import wandb

        inputs: dict[str, Any] = {}
        hparams = dict(pl_module.hparams)
        used: list[wandb.Artifact] = []
        caches = [cb for cb in trainer.callbacks if isinstance(cb, SoftTargetCache)]
        teacher = hparams.get("teacher_ckpt") or next(
            (c.teacher_ckpt for c in caches if c.teacher_ckpt), None
        )
        for role, path in (
            ("teacher", teacher),
            ("generalist", hparams.get("generalist_ckpt")),
            ("groups_file", hparams.get("groups_file")),
        ):
            if path and Path(path).is_file():
                kind = "class-groups" if role == "groups_file" else "model"
                name = artifact_name(kind, path)
                inputs[role] = {
                    "path": str(Path(path).resolve()),
                    "sha256": file_sha256(path),
                    "artifact": name,
                }
                used.append(self._file_artifact(name, kind, path))
        for i, path in enumerate(member_checkpoints(pl_module)):
            if Path(path).is_file():
                name = artifact_name("model", path)
                inputs.setdefault("members", []).append(
                    {
                        "member": i,
                        "path": str(Path(path).resolve()),
                        "sha256": file_sha256(path),
                        "artifact": name,
                    }
                )
                used.append(self._file_artifact(name, "model", path))
        for cache in caches:
            for split in cache.splits:
                store = Path(cache.path) / split
                if not (store / HEADER).is_file() or split in cache.build_stats:
                    continue  # missing, or built by this run: a product, logged at the end
                header = read_header(store)
                name = artifact_name("soft-targets", store)
                inputs.setdefault("soft_targets", {})[split] = {
                    "path": str(store.resolve()),
                    "teacher": header.get("teacher"),
                    "dataset": header.get("dataset"),
                    "artifact": name,
                }
                used.append(self._store_artifact(name, store, header))
        self.inputs = inputs
        for run in self._runs(trainer):
            run.config.update({"lineage": inputs}, allow_val_change=True)
            if not run.offline:  # use_artifact raises offline; the config above holds the lineage
                for artifact in used:
                    run.use_artifact(artifact)

    def _log_products(self, trainer: L.Trainer) -> None:
        artifacts = []
        if self.checkpoints:
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint):
                    path = cb.best_model_path or cb.last_model_path
                    if path and Path(path).is_file():
                        meta = {"monitor": cb.monitor, "score": _number(cb.best_model_score)}
                        meta["epoch"], meta["global_step"] = trainer.current_epoch, trainer.global_step
                        artifacts.append(
                            self._file_artifact(artifact_name("model", path), "model", path, meta)
                        )
        if self.soft_targets:
            for cache in [cb for cb in trainer.callbacks if isinstance(cb, SoftTargetCache)]:
                for split in cache.build_stats:
                    store = Path(cache.path) / split
                    if (store / HEADER).is_file():
                        name = artifact_name("soft-targets", store)
                        artifacts.append(self._store_artifact(name, store, read_header(store)))
        for run in self._runs(trainer):
            for artifact in artifacts:
                run.log_artifact(artifact)
                self.logged.append(artifact.name)
        if self.groups:
            self._log_groups(trainer)

    def _log_groups(self, trainer: L.Trainer) -> None:
        import wandb

        for cb in trainer.callbacks:
            if not (isinstance(cb, ConfusionClustering) and cb.output.is_file()):
                continue
            output = cb.output
            artifact = wandb.Artifact(artifact_name("class-groups", output), type="class-groups")
            artifact.add_file(str(output))
            picture = Path(output).with_suffix(".png")
            if picture.is_file():
                artifact.add_file(str(picture))
            for run in self._runs(trainer):
                run.log_artifact(artifact)
                self.logged.append(artifact.name)

    @staticmethod
    def _file_artifact(name: str, kind: str, path: str | Path, metadata: dict[str, Any] | None = None) -> Any:
        import wandb

        artifact = wandb.Artifact(
            name, type=kind, metadata={"path": str(Path(path).resolve()), **(metadata or {})}
        )
        # "mutable" (a staged copy): an offline run uploads at `wandb sync` time, when a rerun may
        # already have replaced the file.
        artifact.add_file(str(path), policy="mutable")
        return artifact

    @staticmethod
    def _store_artifact(name: str, store: Path, header: dict[str, Any]) -> Any:
        import wandb

        metadata = {k: v for k, v in header.items() if k not in ("checksums", "arrays")}
        artifact = wandb.Artifact(name, type="soft-targets", metadata=metadata)
        artifact.add_file(str(store / HEADER))
        artifact.add_reference(store.resolve().as_uri(), name="store")
        return artifact


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
