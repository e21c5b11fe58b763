"""Groups of classes that a classifier confuses (Hinton, Vinyals & Dean 2015, section 5), and the groups file.

The paper clusters "the covariance matrix of the predictions of our generalist model, so that a set of
classes that are often predicted together" becomes the label set of one specialist, with k-means on the
matrix's columns; no true labels are needed. The package holds that maths as pure functions, one role
per module:

* :mod:`~kd_lightning.clustering.matrices`: :func:`prediction_covariance` (the paper's matrix) and
  :func:`confusion_affinity` (a symmetrised, row-normalised soft confusion matrix, which needs labels),
  chosen by name through :data:`MATRICES`;
* :mod:`~kd_lightning.clustering.grouping`: :func:`cluster_classes`, spectral clustering of the matrix
  as an affinity (:class:`SpectralGrouping`, the default: it recovers groups of uneven sizes) or the
  paper's k-means on the matrix's columns (:class:`KMeansGrouping`), then an exact assignment that
  respects bounds on the group sizes, and optionally overlapping groups (each class in its ``overlap``
  nearest groups);
* :mod:`~kd_lightning.clustering.groups_file`: :class:`ClassGroups`, the groups file of
  docs/architecture.md (``num_classes``, ``class_names``, ``groups``, ``method``, ``source``,
  ``matrix``), validated on read and on write;
* :mod:`~kd_lightning.clustering.collect`: :class:`PredictionCollector`, a torchmetrics metric that
  gathers ``(index, probs, target)`` across processes and drops the duplicates a DistributedSampler
  pads with, so the matrix is the same for any number of processes.

Every public name is importable from ``kd_lightning.clustering`` (e.g. a YAML ``class_path:
kd_lightning.clustering.SpectralGrouping``).
"""

from __future__ import annotations

from kd_lightning.clustering.collect import PredictionCollector, first_per_index
from kd_lightning.clustering.grouping import (
    Grouping,
    KMeansGrouping,
    SpectralGrouping,
    bounded_assignment,
    class_affinity,
    cluster_classes,
    drop_duplicate_groups,
    drop_small_groups,
    groups_to_labels,
)
from kd_lightning.clustering.groups_file import GROUPS_FORMAT_VERSION, ClassGroups
from kd_lightning.clustering.matrices import (
    MATRICES,
    check_probs,
    class_matrix,
    confusion_affinity,
    prediction_covariance,
)

__all__ = [
    "GROUPS_FORMAT_VERSION",
    "MATRICES",
    "ClassGroups",
    "Grouping",
    "KMeansGrouping",
    "PredictionCollector",
    "SpectralGrouping",
    "bounded_assignment",
    "check_probs",
    "class_affinity",
    "class_matrix",
    "cluster_classes",
    "confusion_affinity",
    "drop_duplicate_groups",
    "drop_small_groups",
    "first_per_index",
    "groups_to_labels",
    "prediction_covariance",
]
