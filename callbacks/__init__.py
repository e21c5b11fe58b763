"""Lightning callbacks for distillation (soft-target caching, clustering, teacher placement, dashboards)."""

from callbacks.artifacts import ArtifactLogger
from callbacks.confusion_clustering import ConfusionClustering
from callbacks.dashboard import DistillationDashboard
from callbacks.run_identity import RunIdentity
from callbacks.soft_target_cache import SoftTargetCache
from callbacks.teacher_placement import TeacherPlacement

__all__ = [
    "ArtifactLogger",
    "ConfusionClustering",
    "DistillationDashboard",
    "RunIdentity",
    "SoftTargetCache",
    "TeacherPlacement",
]
