"""Generalist + specialists (Hinton, Vinyals & Dean 2015, section 5), one role per module.

A *specialist* classifies one group of confusable classes plus one *dustbin* class for all others. It
starts from the generalist's weights, trains on batches that over-represent its group, and corrects its
dustbin logit for that oversampling afterwards. At inference the generalist picks its top-``n`` classes,
the specialists whose groups meet them are run, and the full distribution ``q`` minimising
``KL(p_g || q) + sum_m KL(p_m || fold_m(q))`` combines them.

Modules, each depending only on those above it:

- :mod:`~kd_lightning.specialists.sampling`: the group on the data side (resolving the classes,
  relabelling, oversampling and its dustbin correction, the :class:`SpecialistData` protocol); what
  ``kd_lightning.datamodules`` imports.
- :mod:`~kd_lightning.specialists.combination`: the pure maths of combining (fold, KL-combination
  solver, averaging, active specialists, the report).
- :mod:`~kd_lightning.specialists.initialisation`: the head rule and initialisation from the generalist.
- :mod:`~kd_lightning.specialists.module`: :class:`SpecialistModule` (one specialist) and
  :func:`load_specialist`.
- :mod:`~kd_lightning.specialists.ensemble`: :class:`SpecialistTeacher`, the combination as one network
  (a teacher wherever a teacher is accepted), and :class:`SpecialistEnsemble`, its evaluation.

Every public name is importable from this package.
"""

from kd_lightning.specialists.combination import (
    KLCombination,
    active_specialists,
    average_specialists,
    combination_objective,
    fold_log_probs,
    fold_to_group,
    kl_combination,
    specialist_report,
    spread_dustbin,
)
from kd_lightning.specialists.ensemble import (
    METHODS,
    SpecialistEnsemble,
    SpecialistOutputs,
    SpecialistTeacher,
)
from kd_lightning.specialists.initialisation import head_layer, init_from_generalist
from kd_lightning.specialists.module import (
    SPECIALIST_KEY,
    SpecialistModule,
    load_generalist,
    load_specialist,
)
from kd_lightning.specialists.sampling import (
    GroupSampling,
    SpecialistData,
    check_classes,
    dustbin_correction,
    oversampling_factor,
    relabel_map,
    resolve_group,
)

__all__ = [
    "METHODS",
    "SPECIALIST_KEY",
    "GroupSampling",
    "KLCombination",
    "SpecialistData",
    "SpecialistEnsemble",
    "SpecialistModule",
    "SpecialistOutputs",
    "SpecialistTeacher",
    "active_specialists",
    "average_specialists",
    "check_classes",
    "combination_objective",
    "dustbin_correction",
    "fold_log_probs",
    "fold_to_group",
    "head_layer",
    "init_from_generalist",
    "kl_combination",
    "load_generalist",
    "load_specialist",
    "oversampling_factor",
    "relabel_map",
    "resolve_group",
    "specialist_report",
    "spread_dustbin",
]
