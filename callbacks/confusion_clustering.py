"""Find the groups of classes a generalist confuses, from its validation predictions (Hinton et al. 2015, §5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from kd_lightning.cache.protocols import CacheDataModule
from kd_lightning.clustering import (
    MATRICES,
    ClassGroups,
    Grouping,
    PredictionCollector,
    SpectralGrouping,
    class_matrix,
    cluster_classes,
    drop_duplicate_groups,
    drop_small_groups,
)
from kd_lightning.contracts import Batch, EvalOutput, NamedClasses, check_eval_output


class ConfusionClustering(L.Callback):
    """Cluster the classes by the generalist's validation predictions and write the groups file.

    At every ``every_n_epochs``-th validation epoch of ``fit`` (and in every ``validate`` run, e.g.
    ``kd validate --config generalist.yaml --ckpt_path generalist.ckpt``), the callback takes the
    logits of each validation batch from the step's :class:`~kd_lightning.contracts.EvalOutput` (the
    model is not run again), gathers ``(index, softmax, target)`` from every process (padding
    repeats of a DistributedSampler dropped by ``index``), builds the ``matrix`` (the paper's covariance
    of predicted probabilities, or a symmetrised confusion matrix), clusters the classes with
    :func:`~kd_lightning.clustering.cluster_classes`, drops groups smaller than ``min_specialist_size``
    and writes the groups file of docs/architecture.md to ``output`` (atomically, on rank 0; every rank then
    holds the same groups). A heatmap of the matrix with the groups marked is written beside it
    (``<output>.png``) at the end of ``fit``/``validate`` and sent to the logger when it can take images.

    Args:
        num_groups: number of groups ``K`` to cluster into.
        output: path of the groups file (JSON).
        matrix: ``"covariance"`` (the paper's) or ``"confusion"``.
        grouping: :class:`~kd_lightning.clustering.SpectralGrouping` (default: recovers groups of
            uneven sizes) or :class:`~kd_lightning.clustering.KMeansGrouping` (the paper's k-means on
            the matrix's columns; see its docstring for when it is the right choice).
        min_size: least classes per group.
        max_size: most classes per group (``None``: no bound).
        overlap: number of groups each class belongs to (its ``overlap`` nearest), below ``num_groups``;
            overlapping groups stay distinct.
        overlap_threshold: with ``overlap`` > 1, a class joins at most ``overlap - 1`` more groups, only
            those it is confused with (mean affinity at least this fraction of that to its own group;
            see :func:`~kd_lightning.clustering.cluster_classes`); ``None``: exactly ``overlap - 1``.
        min_specialist_size: groups with fewer classes are left out of the file (their classes stay
            with the generalist); 1 keeps every group.
        every_n_epochs: cluster every this many validation epochs during ``fit`` (the last one is the
            one that counts; the file is rewritten each time).
        plot: write and log the heatmap.

    Raises:
        ValueError: an unknown ``matrix`` (the message lists the known ones) or a bad number.
    """

    def __init__(
        self,
        num_groups: int,
        output: str,
        matrix: str = "covariance",
        grouping: Grouping | None = None,
        min_size: int = 1,
        max_size: int | None = None,
        overlap: int = 1,
        overlap_threshold: float | None = None,
        min_specialist_size: int = 2,
        every_n_epochs: int = 1,
        plot: bool = True,
    ) -> None:
        if matrix not in MATRICES:
            raise ValueError(f"`matrix` must be one of {sorted(MATRICES)}, got {matrix!r}.")
        for name, value, least in (
            ("num_groups", num_groups, 1),
            ("overlap", overlap, 1),
            ("min_specialist_size", min_specialist_size, 1),
            ("every_n_epochs", every_n_epochs, 1),
        ):
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}.")
        if overlap > 1 and overlap >= num_groups:
            raise ValueError(
                f"`overlap` must be below `num_groups`={num_groups}, got {overlap}: with every class in every "
                "group the specialists would all be the same."
            )
        self.num_groups = num_groups
        self.output = Path(output)
        self.matrix = matrix
        self.grouping = grouping if grouping is not None else SpectralGrouping()
        self.min_size = min_size
        self.max_size = max_size
        self.overlap = overlap
        self.overlap_threshold = overlap_threshold
        self.min_specialist_size = min_specialist_size
        self.every_n_epochs = every_n_epochs
        self.plot = plot
        self.collector = PredictionCollector()
        self.groups: ClassGroups | None = None
        self._collecting = False

    @override
    def state_dict(self) -> dict[str, Any]:
        # The groups only: the matrix is in the file, and C x C floats would bloat every checkpoint.
        return {"output": str(self.output), "groups": None if self.groups is None else self.groups.groups}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run keeps the groups it had found, if the file on disk still holds them.
        groups, output = state_dict.get("groups"), Path(state_dict.get("output", self.output))
        if groups is not None and output.is_file():
            on_disk = ClassGroups.load(output)
            if on_disk.groups == groups:
                self.groups = on_disk

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collecting = self._due(trainer)
        if self._collecting:
            self.collector.reset()
            self.collector.to(pl_module.device)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: EvalOutput,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._collecting:
            check_eval_output(outputs, pl_module, "ConfusionClustering")
            self._collect(outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._collecting:
            self._collecting = False
            self._cluster(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # a dedicated clustering run
            self._finish(trainer)

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        return last or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _collect(self, outputs: EvalOutput, batch: Batch) -> None:
        probs = outputs["logits"].float().softmax(-1)
        self.collector.update(batch["index"], probs, outputs["target"])

    def _cluster(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _, probs, target = self.collector.compute()  # collective: every rank calls it
        self.collector.reset()
        matrix = class_matrix(self.matrix, probs.cpu(), target.cpu())
        # Every process clusters the same gathered predictions (so a bad setting fails everywhere, not
        # on rank 0 alone while the others wait), then all keep rank 0's groups: one decision.
        groups = trainer.strategy.broadcast(self._groups_file(trainer, pl_module, matrix), src=0)
        if trainer.is_global_zero:
            groups.save(self.output)
        trainer.strategy.barrier("ConfusionClustering")  # the file exists before any process reads it
        self.groups = groups

    def _groups_file(
        self, trainer: L.Trainer, pl_module: L.LightningModule, matrix: torch.Tensor
    ) -> ClassGroups:
        num_classes = matrix.shape[0]
        partition = cluster_classes(
            matrix,
            self.num_groups,
            self.grouping,
            min_size=self.min_size,
            max_size=self.max_size,
            overlap=self.overlap,
            overlap_threshold=self.overlap_threshold,
        )
        kept = drop_duplicate_groups(drop_small_groups(partition, self.min_specialist_size))
        if not kept:
            raise ValueError(
                f"ConfusionClustering: every group of {partition} is smaller than `min_specialist_size`="
                f"{self.min_specialist_size}; lower it or cluster into fewer groups (`num_groups`)."
            )
        datamodule = trainer.datamodule
        names = [str(c) for c in range(num_classes)]
        if isinstance(datamodule, NamedClasses) and datamodule.class_names:
            names = list(datamodule.class_names)
        source: dict[str, Any] = {
            "model": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "partition": partition,
        }
        if isinstance(datamodule, CacheDataModule):
            source["data"] = datamodule.fingerprint("val")
        method = {
            "matrix": self.matrix,
            "num_groups": self.num_groups,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "overlap": self.overlap,
            "overlap_threshold": self.overlap_threshold,
            "min_specialist_size": self.min_specialist_size,
            **self.grouping.describe(),
        }
        return ClassGroups(num_classes, names, kept, method, source, matrix.tolist())

    def _finish(self, trainer: L.Trainer) -> None:
        if self.groups is None or not trainer.is_global_zero:
            return
        rank_zero_info(
            f"ConfusionClustering: {len(self.groups.groups)} groups in {self.output}: {self.groups.named_groups()}"
        )
        if not self.plot:
            return
        from kd_lightning.plots import log_image, plot_class_groups

        g = self.groups
        path = plot_class_groups(
            torch.tensor(g.matrix),
            g.groups,
            g.class_names,
            self.output.with_suffix(".png"),
            title=f"{g.method['matrix']} of the predictions, {len(g.groups)} specialist groups",
        )
        log_image(trainer.loggers, "clustering/groups", path, step=trainer.global_step)  # W&B; errors warn
