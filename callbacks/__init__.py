"""Lightning callbacks for distillation (soft-target caching, clustering, teacher placement, dashboards)."""

from callbacks.confusion_clustering import ConfusionClustering
from callbacks.soft_target_cache import SoftTargetCache

__all__ = ["ConfusionClustering", "SoftTargetCache"]
