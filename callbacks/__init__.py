"""Lightning callbacks for distillation (soft-target caching, clustering, teacher placement, dashboards)."""

from kd_lightning.callbacks.artifacts import ArtifactLogger
from kd_lightning.callbacks.confusion_clustering import ConfusionClustering
from kd_lightning.callbacks.dashboard import DistillationDashboard
from kd_lightning.callbacks.run_identity import RunIdentity
from kd_lightning.callbacks.soft_target_cache import SoftTargetCache
from kd_lightning.callbacks.teacher_placement import TeacherPlacement

__all__ = [
    "ArtifactLogger",
    "ConfusionClustering",
    "DistillationDashboard",
    "RunIdentity",
    "SoftTargetCache",
    "TeacherPlacement",
]
