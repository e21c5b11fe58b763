"""kd-lightning: knowledge distillation on PyTorch Lightning."""

from kd_lightning.ensemble import Ensemble, EnsembleModule, combine_logits
from kd_lightning.losses import distillation_loss, dkd_loss, logit_matching_loss, soft_target_loss
from kd_lightning.models import MLP, SmallCNN
from kd_lightning.modules import ClassifierModule, DistillationModule, load_teacher
from kd_lightning.objectives import DKD, HintonKD, LogitMatching, Objective

__all__ = [
    "DKD",
    "MLP",
    "ClassifierModule",
    "DistillationModule",
    "Ensemble",
    "EnsembleModule",
    "HintonKD",
    "LogitMatching",
    "Objective",
    "SmallCNN",
    "combine_logits",
    "distillation_loss",
    "dkd_loss",
    "load_teacher",
    "logit_matching_loss",
    "soft_target_loss",
]
# The one place the version is written: pyproject.toml reads this literal ([tool.setuptools.dynamic]),
# `kd --version` prints it.
__version__ = "0.1.0"
